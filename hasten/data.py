"""Where hasten keeps downloaded and generated data, and `hasten data fetch NAME`."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

from hasten.errors import HastenError


def cache_dir() -> Path:
    """``$HASTEN_CACHE`` if set, else ``~/.cache/hasten`` (not created here)."""
    return Path(os.environ.get("HASTEN_CACHE") or Path.home() / ".cache" / "hasten").expanduser()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path`` then rename it over ``path``.

    Concurrent writers (several processes fetching at once) each rename a complete file, so readers never see a
    partial one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")  # same suffix: np.savez
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fetch(name: str) -> Path:
    """Make the data of task ``name`` present and return where it is; what cannot be fetched raises HastenError."""
    from hasten.tasks import digits, fashion, get_task, mnist1d_task, shakespeare

    fetchers: dict[str, Callable[[], Path]] = {
        "digits": digits.fetch,
        "fashion": fashion.fetch,
        "mnist1d": mnist1d_task.fetch,
        "shakespeare": shakespeare.fetch,
    }
    task = get_task(name)  # unknown names raise, listing the registered tasks
    if task.name not in fetchers:
        raise HastenError(f"task {task.name!r} has nothing to fetch: {task.data_hint or 'it brings its own data'}")
    return fetchers[task.name]()
