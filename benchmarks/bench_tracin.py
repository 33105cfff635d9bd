"""TracIn benchmark: hasten vs Captum's TracInCP, projection accuracy over d, mislabel detection, peak memory.

    python benchmarks/bench_tracin.py speed       # fashion MLP 784-64-10, 10k train: hasten vs Captum (same files)
    python benchmarks/bench_tracin.py projection  # digits MLP 64-256-256-10: Spearman vs exact over d
    python benchmarks/bench_tracin.py mislabel    # fashion, 10% flipped labels: fraction found vs fraction checked
    python benchmarks/bench_tracin.py memory      # peak RSS of 60k train x 1k test influence (subprocesses)
    python benchmarks/bench_tracin.py all

Every section trains its model with a plain SGD loop (no hasten) and saves checkpoints with torch.save; hasten and
Captum read the same files. Timings: one warm-up, then ``--repeats`` runs alternating the two tools; median and
min-max are reported. Results print as Markdown and are stored as JSON beside ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hasten.influence import TracIn  # noqa: E402

WORK = Path(tempfile.gettempdir()) / "hasten-bench-tracin"


def fashion(flip: float = 0.0, seed: int = 0):
    """Fashion-MNIST via hasten.tasks, flattened to (n, 784); a fraction ``flip`` of train labels changed at random."""
    from hasten.tasks import get_task

    train, test = get_task("fashion").load(None)
    x, y = train.tensors[0].flatten(1), train.tensors[1].clone()
    rng = np.random.default_rng(seed)
    flipped = torch.from_numpy(rng.permutation(len(y))[: int(flip * len(y))])
    y[flipped] = (y[flipped] + torch.from_numpy(rng.integers(1, 10, len(flipped)))) % 10
    return (x, y), (test.tensors[0].flatten(1), test.tensors[1]), flipped


def mlp(sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def train_plain(x, y, sizes, epochs, lr=0.05, batch=128, seed=0, folder=None):
    """SGD with momentum; a checkpoint file (state_dict) after every epoch; returns model, [(path, lr)]."""
    torch.manual_seed(seed)
    model = mlp(sizes)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    folder = Path(folder or WORK / f"ckpt-{'-'.join(map(str, sizes))}-{len(y)}-{seed}")
    folder.mkdir(parents=True, exist_ok=True)
    checkpoints = []
    for epoch in range(epochs):
        order = torch.randperm(len(y))
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        path = folder / f"epoch{epoch + 1}.pt"
        torch.save(model.state_dict(), path)
        checkpoints.append((path, lr))
    return model, checkpoints


def timed(fn, repeats, warmup=True):
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, times


def spread(times):
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def spearman_rows(a, b):
    from scipy.stats import spearmanr

    return float(np.mean([spearmanr(a[i], b[i]).statistic for i in range(len(a))]))


def captum_tracin(model, checkpoints, train, kind="all"):
    """Captum's TracInCP with per-sample gradients on all layers ("all") or the last one ("last"), or
    TracInCPFast ("fast": last layer's weight only, without its bias), reading the same checkpoint files."""
    from captum.influence import TracInCP, TracInCPFast

    lrs = {str(p): lr for p, lr in checkpoints}
    model = copy.deepcopy(model)  # Captum turns off requires_grad outside `layers` and does not restore it

    def load(m, path):  # Captum's load function: read the file, return the learning rate
        m.load_state_dict(torch.load(path, weights_only=True))
        return lrs[path]

    loss = nn.CrossEntropyLoss(reduction="sum")
    dataset, paths = torch.utils.data.TensorDataset(*train), [str(p) for p, _ in checkpoints]
    if kind == "fast":
        return TracInCPFast(model, model[-1], dataset, paths, load, loss_fn=loss, batch_size=2048)
    layers = [str(len(model) - 1)] if kind == "last" else None
    return TracInCP(model, dataset, paths, load, layers=layers, loss_fn=loss, batch_size=2048,
                    sample_wise_grads_per_batch=True)


def bench_speed(repeats):
    (x, y), (xt, yt), _ = fashion()
    model, checkpoints = train_plain(x, y, (784, 64, 10), epochs=3)
    train, out = (x[:10000], y[:10000]), {}

    def compare(key, ours_fn, theirs_fn, slow=False):
        """Alternate the two tools run by run, so that a change in machine load hits both alike."""
        a, b = ours_fn(), (None if slow else theirs_fn())  # warm-up (skipped for Captum's minute-long runs)
        t_ours, t_theirs = [], []
        for r in range(repeats):
            a, t = timed(ours_fn, 1, warmup=False)
            t_ours += t
            if r < (2 if slow else repeats):
                b, t = timed(theirs_fn, 1, warmup=False)
                t_theirs += t
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        out[key] = dict(hasten=spread(t_ours), captum=spread(t_theirs),
                        ratio=statistics.median(t_theirs) / statistics.median(t_ours),
                        max_rel_diff=float((a - b).abs().max() / b.abs().max()), spearman=spearman_rows(a, b))
        print(key, json.dumps(out[key]), file=sys.stderr)

    for n_test in (100, 1000):
        test = (xt[:n_test], yt[:n_test])
        for kind in ("all", "last", "fast"):
            layers = None if kind == "all" else "last"
            ours = TracIn(model, F.cross_entropy, checkpoints, layers=layers, batch_size=2048)
            theirs = captum_tracin(model, checkpoints, train, kind)
            compare(f"influence 10000x{n_test} {kind}", lambda: ours.influence(train, test),
                    lambda: theirs.influence(test), slow=n_test > 100 and kind == "all")
    for kind in ("all", "last", "fast"):
        layers = None if kind == "all" else "last"
        ours = TracIn(model, F.cross_entropy, checkpoints, layers=layers, batch_size=2048)
        theirs = captum_tracin(model, checkpoints, train, kind)
        compare(f"self-influence 10000 {kind}", lambda: ours.self_influence(train), lambda: theirs.self_influence())
    return out


def bench_projection(repeats, dims=(128, 256, 512, 1024, 2048, 4096), n_train=1000, n_test=50):
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    x, y = torch.tensor(d.data[order] / 16.0, dtype=torch.float32), torch.tensor(d.target[order])
    model, checkpoints = train_plain(x[:1400], y[:1400], (64, 256, 256, 10), epochs=6, batch=32)
    train, test = (x[:n_train], y[:n_train]), (x[1400 : 1400 + n_test], y[1400 : 1400 + n_test])
    exact = TracIn(model, F.cross_entropy, checkpoints)
    (s_exact, i_exact), t_exact = timed(lambda: (exact.self_influence(train), exact.influence(train, test)), repeats)
    rows = [dict(d="exact", self_spearman=1.0, influence_spearman=1.0, **spread(t_exact))]
    from scipy.stats import spearmanr

    for dim in dims:
        proj = TracIn(model, F.cross_entropy, checkpoints, projection_dim=dim, seed=0)
        (s, i), t = timed(lambda: (proj.self_influence(train), proj.influence(train, test)), 1)
        rows.append(dict(d=dim, self_spearman=float(spearmanr(s_exact, s).statistic),
                         influence_spearman=spearman_rows(i_exact, i), **spread(t)))
    return dict(rows=rows, n_train=n_train, n_test=n_test, checkpoints=len(checkpoints))


def bench_mislabel(fractions=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)):
    """Two regimes: a small MLP trained briefly (underfits the flipped labels) and a wider one trained long enough
    to start memorizing them, where the final loss says less and the checkpoints' history says more."""
    (x, y), _, flipped = fashion(flip=0.1, seed=1)
    is_flipped = torch.zeros(len(y), dtype=torch.bool)
    is_flipped[flipped] = True
    out = {}
    for name, sizes, epochs, every in (("784-64-10, 4 epochs", (784, 64, 10), 4, 1),
                                       ("784-256-256-10, 30 epochs", (784, 256, 256, 10), 30, 5)):
        model, checkpoints = train_plain(x, y, sizes, epochs=epochs, seed=1)
        checkpoints = checkpoints[every - 1 :: every]
        rankings, seconds = {}, {}
        for label, layers in (("self-influence", None), ("self-influence, last layer", "last")):
            t = time.perf_counter()
            scores = TracIn(model, F.cross_entropy, checkpoints, layers=layers, batch_size=4096).self_influence((x, y))
            seconds[label] = time.perf_counter() - t
            rankings[label] = torch.argsort(scores, descending=True)
        with torch.no_grad():
            final_loss = F.cross_entropy(model(x), y, reduction="none")
            train_acc = float((model(x).argmax(1) == y)[is_flipped].float().mean())
        rankings["final loss"] = torch.argsort(final_loss, descending=True)
        rankings["random"] = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
        curves = {k: (is_flipped[order].cumsum(0).float() / len(flipped)) for k, order in rankings.items()}
        out[name] = dict(table={k: {f: float(c[int(f * len(y)) - 1]) for f in fractions} for k, c in curves.items()},
                         auc={k: float(c.mean()) for k, c in curves.items()}, seconds=seconds,
                         checkpoints=[str(p.name) for p, _ in checkpoints],
                         flipped_fit_by_model=train_acc)
        _plot(curves, WORK / f"tracin_mislabel_{sizes[1]}.png", name)
    return dict(runs=out, n=len(y), flipped=len(flipped))


def _plot(curves, path, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    grid = torch.linspace(0, 1, len(next(iter(curves.values()))))
    for name, c in curves.items():
        ax.plot(grid.numpy(), c.numpy(), label=name)
    ax.set_xlabel("fraction of training set checked")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def memory_child(tool: str, n_test: int) -> None:
    """Run in a subprocess: 60k x n_test influence with one tool; print seconds and peak RSS as JSON."""
    (x, y), (xt, yt), _ = fashion()
    model = mlp((784, 64, 10))
    checkpoints = [(WORK / f"ckpt-784-64-10-{len(y)}-0" / f"epoch{e}.pt", 0.05) for e in (1, 2, 3)]  # from the parent
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if tool == "hasten":
        tracin = TracIn(model, F.cross_entropy, checkpoints, batch_size=2048)
        scores = tracin.influence((x, y), (xt[:n_test], yt[:n_test]))
    else:
        scores = captum_tracin(model, checkpoints, (x, y)).influence((xt[:n_test], yt[:n_test]))
    elapsed = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(tool=tool, seconds=elapsed, peak_rss_mb=peak / 1024, rss_before_mb=base / 1024,
                          output_mb=scores.numel() * scores.element_size() / 2**20)))


def bench_memory(tools=("hasten", "captum"), n_test=1000):
    fashion()  # the data files are read once here so both children find them warm in the page cache
    train_plain(*fashion()[0], (784, 64, 10), epochs=3)  # checkpoints written once, reused by the children
    out = {}
    for tool in tools:
        proc = subprocess.run([sys.executable, __file__, "memory-child", tool, str(n_test),
                               f"--threads={torch.get_num_threads()}"], capture_output=True,
                              text=True, check=True)
        out[tool] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def environment():
    def git(*args):
        try:
            proc = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True)
            return proc.stdout.strip()
        except OSError:
            return ""

    import captum

    return dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), machine=platform.machine(), cpus=os.cpu_count(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__, captum=captum.__version__,
                python=platform.python_version(), commit=git("rev-parse", "--short", "HEAD"),
                load_average=os.getloadavg())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=["speed", "projection", "mislabel", "memory", "all", "memory-child"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(WORK / "results.json"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    a = parser.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    if a.section == "memory-child":
        return memory_child(a.args[0], int(a.args[1]))
    sections = ["speed", "projection", "mislabel", "memory"] if a.section == "all" else [a.section]
    results = {"environment": environment()}
    for name in sections:
        t = time.perf_counter()
        if name == "speed":
            results[name] = bench_speed(a.repeats)
        elif name == "projection":
            results[name] = bench_projection(max(1, a.repeats // 2))
        elif name == "mislabel":
            results[name] = bench_mislabel()
        else:
            results[name] = bench_memory()
        print(f"[{name}: {time.perf_counter() - t:.0f} s]", file=sys.stderr)
    results["environment"]["load_average_end"] = os.getloadavg()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.is_file() else {}
    existing.update({k: v for k, v in results.items() if k != "environment"})
    existing.setdefault("environments", {}).update({s: results["environment"] for s in sections})
    out.write_text(json.dumps(existing, indent=1, default=str))
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
