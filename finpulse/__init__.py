"""finpulse: real-time financial news monitor that keeps learning (composition root: CLI, config, demo).

For analysts in Python, `finpulse.history(sql)` returns an Arrow table of the news history, read-only:

    >>> import finpulse
    >>> table = finpulse.history("SELECT topic, count(*) AS n FROM news GROUP BY topic")  # doctest: +SKIP
    >>> table.to_pandas()  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finpulse.config import AppConfig

__version__ = "0.1.0"
__all__ = ["__version__", "history"]


def history(
    sql: str = "SELECT * FROM news ORDER BY scored_at DESC LIMIT 1000",
    params: Sequence[object] = (),
    *,
    as_of: int | dt.datetime | None = None,
    timeout_s: float | None = None,
    config: AppConfig | None = None,
) -> Any:
    """Run one read-only query on the news history and return a `pyarrow.Table`.

    The config is found as the CLI finds it (`$FINPULSE_CONFIG`, `./finpulse.toml`, the environment) unless one
    is given; `as_of` is a lake snapshot id or a time, for the history as it was then.
    """
    from finpulse.config import load_config
    from storage import History

    lake = History((config or load_config()).storage).lake
    return lake.arrow(sql, params, as_of=as_of, timeout_s=timeout_s)
