"""Step time of a Hugging Face Trainer with NoiseScaleCallback ÷ without (issue 12 target: ≤ 1.05).

    python benchmarks/bench_hf.py                     # tiny GPT-2 (2 x 128) on Shakespeare, batch 32 = 4 x 8, 10 rounds
    python benchmarks/bench_hf.py --every 4           # measure one step in 4
    python benchmarks/bench_hf.py --small all         # read every micro-batch's gradient
    python benchmarks/bench_hf.py --quick             # a smoke run of the script itself (numbers meaningless)

One model, one data set, one TrainingArguments. Each round trains ``--steps`` optimizer steps with the callback and
``--steps`` without (ABBA order over rounds, so neither always runs first), each segment a fresh Trainer on the same
model (the callback's hooks are installed at ``on_train_begin`` and removed at ``on_train_end``, so the segments
without it run a clean model). A timing callback stamps ``on_step_begin`` and ``on_step_end`` (forward, backward,
clipping, optimizer step: what the meter can slow down; the batch is fetched before ``on_step_begin`` and logging
comes after ``on_step_end``); the first ``--warmup`` steps of each segment are dropped. We report the ratios of the
mean and of the median step times, wall and process CPU, and the min-max over rounds of the per-round mean ratio.
The raw per-step times go with the summary, one JSON line appended to benchmarks/results/hf_overhead.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "hf_overhead.jsonl"


def _tokens(path: str | None, quick: bool) -> tuple[torch.Tensor, str]:
    from hasten.tasks import shakespeare

    file = shakespeare.text_path(path)
    if not file.is_file():
        if not quick:
            sys.exit(f"no text at {file}: run `python -m hasten.cli.main data fetch shakespeare` or pass --data FILE")
        return torch.randint(0, 256, (1 << 16,), generator=torch.Generator().manual_seed(0)), "random bytes"
    return torch.from_numpy(np.frombuffer(file.read_bytes(), dtype=np.uint8).astype(np.int64)), str(file)


class Windows(torch.utils.data.Dataset):
    def __init__(self, tokens: torch.Tensor, block: int):
        self.w = tokens[: len(tokens) // block * block].view(-1, block)

    def __len__(self):
        return len(self.w)

    def __getitem__(self, i):
        return {"input_ids": self.w[i], "labels": self.w[i]}


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def _ratios(with_meter: list, without: list) -> dict:
    out = {}
    for i, clock in enumerate(("wall", "cpu")):
        a, b = [t[i] for t in with_meter], [t[i] for t in without]
        out.update({f"{clock}_step_ms_without": 1e3 * statistics.median(b),
                    f"{clock}_step_ms_with": 1e3 * statistics.median(a),
                    f"{clock}_ratio_median": statistics.median(a) / statistics.median(b),
                    f"{clock}_ratio_mean": statistics.fmean(a) / statistics.fmean(b)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10, help="segments with and without the callback, each")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per segment")
    p.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of each segment")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per optimizer step")
    p.add_argument("--accumulation", type=int, default=4, help="gradient_accumulation_steps")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--every", type=int, default=1, help="NoiseScaleCallback(every=...)")
    p.add_argument("--small", default="first", choices=["first", "all"], help="NoiseScaleCallback(small=...)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--data", default=None, help="a text file (default: the fetched Shakespeare)")
    p.add_argument("--quick", action="store_true", help="tiny settings, to check that the script runs")
    p.add_argument("--out", default=str(RESULTS), help="JSON lines file to append the result to")
    a = p.parse_args()
    if a.quick:
        a.rounds, a.steps, a.warmup, a.batch_size, a.accumulation = 2, 4, 1, 4, 2
        a.block_size, a.layers, a.width = 16, 1, 32
        if a.out == str(RESULTS):  # meaningless numbers stay out of the results
            a.out = str(Path(tempfile.gettempdir()) / "hf_overhead_quick.jsonl")
    torch.set_num_threads(a.threads)

    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from hasten.integrations.transformers import NoiseScaleCallback

    cuda = a.device == "cuda"

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[tuple[float, float]] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self._t = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.times.append((time.perf_counter() - self._t[0], time.process_time() - self._t[1]))

    tokens, source = _tokens(a.data, a.quick)
    data = Windows(tokens, a.block_size)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=a.block_size, n_embd=a.width, n_layer=a.layers,
                        n_head=max(1, a.width // 64), bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    noise = NoiseScaleCallback(every=a.every, small=a.small)  # one callback: its estimate runs over all its segments
    times = {True: [], False: []}
    per_round = []
    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(
            output_dir=out_dir, max_steps=a.steps, learning_rate=1e-3, per_device_train_batch_size=a.batch_size //
            a.accumulation, gradient_accumulation_steps=a.accumulation, logging_steps=a.steps, save_strategy="no",
            report_to="none", disable_tqdm=True, use_cpu=not cuda, seed=0, dataloader_num_workers=0)
        for r in range(a.rounds):
            order = (True, False) if r % 2 == 0 else (False, True)  # ABBA over rounds
            got = {}
            for meter in order:
                timer = StepTimer()
                trainer = Trainer(model=model, args=args, train_dataset=data,
                                  callbacks=[timer, noise] if meter else [timer])
                trainer.train()
                got[meter] = timer.times[a.warmup:]
                times[meter] += got[meter]
            per_round.append(statistics.fmean(t[0] for t in got[True]) / statistics.fmean(t[0] for t in got[False]))
    est = noise.estimate
    result = {
        "benchmark": "hf_trainer_noise_callback", **_ratios(times[True], times[False]),
        "wall_round_ratio_min": min(per_round), "wall_round_ratio_max": max(per_round),
        "steps_timed_each": len(times[True]), "b_simple_tokens": est.b_simple, "measured_steps": est.n_steps,
        "settings": {k: v for k, v in vars(a).items() if k != "out"}, "data": source,
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                        "git": _git_commit(), "load_average": os.getloadavg()[0]},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "raw_step_s": {"with": times[True], "without": times[False]},
    }
    summary = {k: v for k, v in result.items() if k not in ("raw_step_s", "settings", "environment")}
    print(json.dumps(summary))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
