"""NoiseScaleCallback inside a real transformers.Trainer, against brute-force noise scales at fixed parameters."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hasten.errors import HastenError  # noqa: E402
from hasten.integrations.transformers import NoiseScaleCallback, _StepReader  # noqa: E402
from hasten.measure import MicroBatchTap, NoiseScale  # noqa: E402

N, D_IN, HIDDEN, CLASSES = 2048, 16, 64, 4
BATCH = 64
EPOCHS = 6  # 192 steps of 64 examples at fixed parameters


class Teacher(nn.Module):
    """An MLP classifier that returns its loss in a dict, as HF models do."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


class Rows(torch.utils.data.Dataset):
    def __init__(self, **columns):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


class Recording(NoiseScale):
    def __init__(self):
        super().__init__()
        self.calls = []

    def update(self, sq_small, b_small, sq_big, b_big):
        self.calls.append((float(sq_small), float(b_small), float(sq_big), float(b_big)))
        return super().update(sq_small, b_small, sq_big, b_big)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; the machine's cores are shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher():
    """(dataset, model state, {b_simple, grad_sq, trace_cov} over the population by brute force over per-example
    gradients: |G|² of the mean gradient, tr Σ with Bessel's correction, which batches drawn without replacement
    estimate with NoiseScale(dataset_size=N))."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D_IN, generator=gen)
    y = torch.multinomial(torch.softmax(3 * x @ torch.randn(D_IN, CLASSES, generator=gen), 1), 1, generator=gen)[:, 0]
    torch.manual_seed(1)
    model = Teacher()
    params = {k: v.detach() for k, v in model.named_parameters()}
    per_example = vmap(grad(lambda p, xi, yi: functional_call(model, p, (xi[None], yi[None]))["loss"]),
                       in_dims=(None, 0, 0))(params, x, y)
    g = torch.cat([v.flatten(1) for v in per_example.values()], 1).double()
    mean = g.mean(0)
    trace_cov, grad_sq = float(((g - mean) ** 2).sum() / (N - 1)), float(mean.square().sum())
    truth = {"b_simple": trace_cov / grad_sq, "grad_sq": grad_sq, "trace_cov": trace_cov}
    return Rows(x=x, labels=y), model.state_dict(), truth


def train(model, dataset, callback, tmp_path, *, accumulation, batch=BATCH, epochs=1, max_steps=-1, clip=1.0,
          logging_steps=1, extra=()):
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch // accumulation,
        gradient_accumulation_steps=accumulation, learning_rate=0.0, num_train_epochs=epochs,
        max_steps=max_steps, max_grad_norm=clip, report_to="none", logging_steps=logging_steps, save_strategy="no",
        disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback, *extra])
    trainer.train()
    return trainer


def teacher_run(teacher, tmp_path, accumulation, epochs, **kwargs):
    """The callback, the trainer, and the largest relative error of b_simple, grad_sq, trace_cov (name, error)."""
    dataset, state, truth = teacher
    model = Teacher()
    model.load_state_dict(state)
    cb = NoiseScaleCallback()
    trainer = train(model, dataset, cb, tmp_path, accumulation=accumulation, epochs=epochs, logging_steps=8, **kwargs)
    errors = {k: getattr(cb.estimate, k) / v - 1 for k, v in truth.items()}
    print({k: f"{v:+.2%}" for k, v in errors.items()})
    return cb, trainer, max(errors.items(), key=lambda kv: abs(kv[1]))


def test_micro_batches_match_brute_force_with_clipping_on_every_step(teacher, tmp_path):
    cb, trainer, error = teacher_run(teacher, tmp_path, accumulation=4, epochs=EPOCHS, clip=1e-3)
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert len(logs) == 4 * EPOCHS and all(h["grad_norm"] > 1e-2 for h in logs)  # pre-clip norms: always clipped
    assert abs(error[1]) < 0.10, f"{error[0]} off by {error[1]:+.1%} from brute force"
    assert cb.estimate.n_steps == 32 * EPOCHS and cb.estimate.n_skipped == 0
    assert all(h["noise/b_simple"] > 0 and "noise/trace_cov" in h for h in logs)
    assert trainer.state.log_history[-1]["noise/b_simple"] == cb.estimate.b_simple  # the train summary log too
    low, high = cb.estimate.interval
    assert math.isfinite(low) and low < cb.estimate.b_simple < high


def test_per_example_matches_brute_force_with_clipping(teacher, tmp_path):
    cb, trainer, error = teacher_run(teacher, tmp_path, accumulation=1, epochs=3, clip=1e-3)
    assert abs(error[1]) < 0.05, f"{error[0]} off by {error[1]:+.1%} from brute force"
    assert cb.estimate.n_steps == 96 and "noise/b_simple" in trainer.state.log_history[-2]


def _ignore_divisor(monkeypatch):
    step = MicroBatchTap.step
    monkeypatch.setattr(MicroBatchTap, "step", lambda self, *a, **kw: step(self, *a, **kw, accumulation_steps=1))


def _read_after_clipping(monkeypatch):
    monkeypatch.setattr(_StepReader, "_queue", lambda self, grad: None)
    monkeypatch.setattr(_StepReader, "step_if_missed",
                        lambda self: (self.tap.step(sum(self.sizes), micro_batch_sizes=self.sizes), self.discard()))


@pytest.mark.parametrize("bug", [_ignore_divisor, _read_after_clipping])
def test_the_accuracy_check_catches_planted_bugs(teacher, tmp_path, monkeypatch, bug):
    bug(monkeypatch)
    _, _, error = teacher_run(teacher, tmp_path, accumulation=4, epochs=1, clip=1e-3)
    assert not abs(error[1]) < 0.10


def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def padded_sequences(rows=16, length=24):
    """Token rows whose label tails are -100 by different amounts, so micro-batches hold different token counts."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (rows, length), generator=gen)
    labels = ids.clone()
    for i in range(rows):
        labels[i, length - 3 * (i % 7) :] = -100
    return Rows(input_ids=ids, labels=labels)


class Inputs(TrainerCallback):
    """Records each micro-batch the model receives in training (a forward pre-hook)."""

    def __init__(self, model):
        self.batches = []
        model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self.batches.append({k: v for k, v in kwargs.items() if k in ("input_ids", "labels", "num_items_in_batch")})


def flat_grad(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).double()


@pytest.mark.parametrize("small", ["first", "all"])
def test_num_items_in_batch_pair_is_per_token_and_matches_brute_force(tmp_path, small):
    model, k = tiny_gpt2(), 4
    inputs, cb = Inputs(model), NoiseScaleCallback(small=small)
    cb.noise = Recording()
    train(model, padded_sequences(), cb, tmp_path, accumulation=k, batch=2 * k, max_steps=2, clip=1e-4)
    assert len(cb.noise.calls) == 2 and all("num_items_in_batch" in b for b in inputs.batches)
    for step, (sq_small, b_small, sq_big, b_big) in enumerate(cb.noise.calls):
        batches = inputs.batches[step * k : (step + 1) * k]
        n = [int(b["labels"][:, 1:].ne(-100).sum()) for b in batches]  # causal LM: position 0 is never a target
        assert b_big == sum(n) and len(set(n)) > 1  # (the Trainer's num_items_in_batch counts position 0 for GPT-2)
        # Each micro-batch's mean per-token gradient (the model's own token mean), and the batch's token-weighted mean.
        g = [flat_grad(model, model(input_ids=b["input_ids"], labels=b["labels"]).loss) for b in batches]
        big = sum(nj * gj for nj, gj in zip(n, g)) / sum(n)
        read = g[:1] if small == "first" else g
        want_small = sum(gj.square().sum() for gj in read) / len(read)
        want_b_small = len(read) / sum(1 / nj for nj in n[: len(read)])
        assert b_small == pytest.approx(want_b_small)
        assert sq_small == pytest.approx(float(want_small), rel=1e-4)
        assert sq_big == pytest.approx(float(big.square().sum()), rel=1e-4)


def test_every_and_attach_put_the_keys_ahead_of_other_callbacks(tmp_path):
    seen = []

    class Reporter(TrainerCallback):  # stands for a report_to integration, which runs before user callbacks
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    model, cb = tiny_gpt2(), NoiseScaleCallback(every=2)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             learning_rate=0.0, max_steps=4, report_to="none", logging_steps=1, save_strategy="no",
                             disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=padded_sequences(), callbacks=[Reporter()])
    cb.attach(trainer)
    trainer.train()
    assert cb.estimate.n_steps == 2  # steps 0 and 2 of 4
    assert [("noise/b_simple" in logs) for logs in seen] == [True, False, True, False, True]


def test_bad_input_is_one_line_naming_the_fix(tmp_path):
    with pytest.raises(HastenError, match="gradient_accumulation_steps >= 2") as info:
        _train_gpt2_without_accumulation(tmp_path)  # GPT-2's Conv1D layers have no per-example rule
    assert "\n" not in str(info.value) and "transformer.h.0.attn.c_attn.weight" in str(info.value)
    with pytest.raises(HastenError, match="gradient_accumulation_steps >= 2"):
        _train_gpt2_without_accumulation(tmp_path, source="micro")
    with pytest.raises(HastenError, match="source"):
        NoiseScaleCallback(source="ddp")


def _train_gpt2_without_accumulation(tmp_path, source="auto"):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to="none",
                             save_strategy="no", disable_tqdm=True, use_cpu=True)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=padded_sequences(),
            callbacks=[NoiseScaleCallback(source=source)]).train()


class _Scaler:  # stands for accelerate's GradScaler under fp16: the loss was multiplied by its scale
    def __init__(self, scale):
        self.scale = scale

    def get_scale(self):
        return self.scale

    def is_enabled(self):
        return True


@pytest.mark.parametrize("per_example", [False, True])
def test_gradients_are_unscaled_by_the_grad_scaler(teacher, per_example):
    from accelerate.state import GradientState

    from hasten.integrations.transformers import _StepReader
    from hasten.measure import PerExampleTap

    dataset, state, _ = teacher
    calls = []
    for scale in (1.0, 1024.0):
        model, noise = Teacher(), Recording()
        model.load_state_dict(state)
        tap = PerExampleTap(model, noise) if per_example else MicroBatchTap(model, noise)
        reader = _StepReader(model, tap, _Scaler(scale))
        k = 1 if per_example else 4
        for j in range(k):  # what the Trainer does for one step: the last micro-batch is marked for gradient sync
            GradientState()._set_sync_gradients(j == k - 1)
            rows = dataset[j * 16 : (j + 1) * 16]
            (model(**rows)["loss"] / k * scale).backward()
        reader.step_if_missed()
        calls.append(noise.calls)
    assert len(calls[0]) == 1 and calls[1][0] == pytest.approx(calls[0][0], rel=1e-5)
