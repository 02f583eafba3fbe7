"""Rolling windows of one (environment, model): per version and scope, the newest samples.

Each (version, scope) keeps two series, labelled predictions (``Outcome``) and logged
ones (``Logged``), ordered by *prediction* time ``at``: a label arriving late and out of
order lands where its prediction was, and a window of "the last 50 labelled" means the 50
newest predictions that have a label. A series holds at most ``max_count`` samples and
none older than ``max_age_s`` before the view's ``now``; a sample older than everything a
full series holds is dropped at once.

A label updated to a different value comes back from the stream as a new ``Outcome`` for
the same ``prediction_id``: it replaces the previous one in place (same ``at``), so the
window counts that prediction once, with its latest label. For sequential tests it is a
new observation (``new_outcomes``, in label-arrival order).

Versions have windows of their own, so a new version taking the traffic starts empty;
``keep_versions`` forgets versions no longer watched. ``to_state``/``from_state`` carry the
windows between passes as compact JSON, rewritten every pass, so it holds only what the
rules read: each sample once per version, times as integer microseconds (each row's
``at`` after the previous row's, a label's time after its prediction's), variant and
segment values as an index into a table, floats rounded; and a logged sample's
probabilities and input statistics only while it is among the newest ``detail_count`` of
one of its scopes (the drift windows, ``detail_for``); confidence and predicted label stay
for every sample.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from loopline.clock import from_us, to_us
from loopline.monitor.types import GLOBAL, Logged, Outcome, scope_name

if TYPE_CHECKING:
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.monitor.config import AlertRule, MonitorConfig
    from loopline.monitor.reference import Reference
    from loopline.monitor.stream import NewRows
    from loopline.monitor.types import VersionView

STATE_VERSION = 2
MIN_COUNT = 500
DEFAULT_MAX_AGE_S = 7 * 86400.0  # when some window is a count: keep a week of samples
DETAIL_METRICS = ("drift.inputs", "drift.softmax")  # the rules that read probabilities/stats

S = TypeVar("S", Outcome, Logged)


class _Series(Generic[S]):
    """Samples by (at, prediction_id), at most ``max_count``, oldest first."""

    __slots__ = ("items", "keys")

    def __init__(self) -> None:
        self.keys: list[tuple[datetime, str]] = []
        self.items: dict[str, S] = {}

    def put(self, sample: S, max_count: int) -> None:
        pid = sample.prediction_id
        old = self.items.get(pid)
        if old is not None:
            if old.at != sample.at:  # the same prediction cannot move; keep keys consistent
                self.keys.remove((old.at, pid))
                bisect.insort(self.keys, (sample.at, pid))
            self.items[pid] = sample
            return
        key = (sample.at, pid)
        if len(self.keys) >= max_count and key < self.keys[0]:
            return  # older than everything a full series holds
        bisect.insort(self.keys, key)
        self.items[pid] = sample
        while len(self.keys) > max_count:
            _, dropped = self.keys.pop(0)
            del self.items[dropped]

    def prune(self, oldest: datetime) -> None:
        cut = bisect.bisect_left(self.keys, (oldest, ""))
        if cut:
            for _, pid in self.keys[:cut]:
                del self.items[pid]
            del self.keys[:cut]

    def newest(self, count: int | None, since: datetime | None) -> list[S]:
        start = 0 if since is None else bisect.bisect_left(self.keys, (since, ""))
        if count is not None:
            start = max(start, len(self.keys) - count)
        return [self.items[pid] for _, pid in self.keys[start:]]


def _scopes_of(sample: Outcome | Logged) -> list[str]:
    return [GLOBAL, *(scope_name(c, v) for c, v in sample.segments.items())]


def _in_scope(sample: Outcome | Logged, scope: str) -> bool:
    return scope == GLOBAL or scope in _scopes_of(sample)


class Windows:
    """Bounded windows per (version, scope) of one (environment, model)."""

    def __init__(self, max_count: int, max_age_s: float, detail_count: int | None = None) -> None:
        self.max_count = max_count
        self.max_age_s = max_age_s
        self.detail_count = max_count if detail_count is None else detail_count
        self._labelled: dict[int, dict[str, _Series[Outcome]]] = {}
        self._logged: dict[int, dict[str, _Series[Logged]]] = {}
        self._new_outcomes: dict[int, list[Outcome]] = {}
        self._new_logged: dict[int, list[Logged]] = {}

    def add(self, new: NewRows) -> None:
        """Put a pass's new rows in their windows; they become the views' ``new_*``."""
        self._new_outcomes, self._new_logged = {}, {}
        for o in new.outcomes:
            self._put(self._labelled, o)
            self._new_outcomes.setdefault(o.model_version, []).append(o)
        for lg in new.logged:
            self._put(self._logged, lg)
            self._new_logged.setdefault(lg.model_version, []).append(lg)

    def _put(self, table: dict[int, dict[str, _Series[Any]]], sample: Outcome | Logged) -> None:
        series = table.setdefault(sample.model_version, {})
        for scope in _scopes_of(sample):
            series.setdefault(scope, _Series()).put(sample, self.max_count)

    def versions(self) -> list[int]:
        """The versions with samples, ascending."""
        return sorted(set(self._labelled) | set(self._logged))

    def keep_versions(self, versions: Iterable[int]) -> None:
        """Forget the windows of every version not in ``versions``."""
        keep = set(versions)
        for table in (self._labelled, self._logged, self._new_outcomes, self._new_logged):
            for v in [v for v in table if v not in keep]:
                del table[v]

    def prune(self, now: datetime) -> None:
        """Drop samples older than ``max_age_s`` before ``now``."""
        oldest = now - timedelta(seconds=self.max_age_s)
        for table in (self._labelled, self._logged):
            for by_scope in table.values():
                for series in by_scope.values():
                    series.prune(oldest)

    def view(
        self,
        environment: str,
        model_name: str,
        version: int,
        now: datetime,
        store: MetadataStore,
        reference: Reference | None,
    ) -> VersionView:
        """The windows of ``version`` at ``now`` (samples past ``max_age_s`` dropped)."""
        self.prune(now)
        return WindowView(
            environment=environment,
            model_name=model_name,
            model_version=version,
            now=now,
            store=store,
            reference=reference,
            _labelled=self._labelled.get(version, {}),
            _logged=self._logged.get(version, {}),
            _new_outcomes=self._new_outcomes.get(version, []),
            _new_logged=self._new_logged.get(version, []),
        )

    def to_state(self) -> dict[str, Any]:
        """The windows as compact JSON (the ``new_*`` rows are not kept)."""
        versions: dict[str, Any] = {}
        for v in self.versions():
            logged = self._logged.get(v, {})
            detailed = {
                lg.prediction_id
                for series in logged.values()
                for lg in series.newest(self.detail_count, None)
            } if self.detail_count > 0 else set()  # fmt: skip
            versions[str(v)] = _pack(_union(self._labelled.get(v, {})), _union(logged), detailed)
        return {"v": STATE_VERSION, "versions": versions}

    @classmethod
    def from_state(
        cls,
        d: dict[str, Any] | None,
        max_count: int,
        max_age_s: float,
        detail_count: int | None = None,
    ) -> Windows:
        """Windows from ``to_state`` (empty for None or another state version)."""
        w = cls(max_count, max_age_s, detail_count)
        if not d or d.get("v") != STATE_VERSION:
            return w
        for v, packed in (d.get("versions") or {}).items():
            outcomes, logged = _unpack(packed, int(v))
            for o in outcomes:
                w._put(w._labelled, o)
            for lg in logged:
                w._put(w._logged, lg)
        return w


@dataclass
class WindowView:
    """``VersionView`` over one version's windows (see ``loopline.monitor.types``)."""

    environment: str
    model_name: str
    model_version: int
    now: datetime
    store: MetadataStore
    reference: Reference | None
    _labelled: dict[str, _Series[Outcome]] = field(repr=False)
    _logged: dict[str, _Series[Logged]] = field(repr=False)
    _new_outcomes: list[Outcome] = field(repr=False)
    _new_logged: list[Logged] = field(repr=False)

    def scopes(self, segment_by: list[str]) -> list[str]:
        """GLOBAL, then one scope per value seen of each ``segment_by`` column, sorted."""
        prefixes = tuple(scope_name(c, "") for c in segment_by)
        seen = {s for s in (*self._labelled, *self._logged) if s.startswith(prefixes)}
        return [GLOBAL, *sorted(seen)]

    def _since(self, seconds: float | None) -> datetime | None:
        return None if seconds is None else self.now - timedelta(seconds=seconds)

    def labelled(
        self, scope: str, count: int | None = None, seconds: float | None = None
    ) -> list[Outcome]:
        series = self._labelled.get(scope)
        return series.newest(count, self._since(seconds)) if series else []

    def logged(
        self, scope: str, count: int | None = None, seconds: float | None = None
    ) -> list[Logged]:
        series = self._logged.get(scope)
        return series.newest(count, self._since(seconds)) if series else []

    def new_outcomes(self, scope: str) -> list[Outcome]:
        return [o for o in self._new_outcomes if _in_scope(o, scope)]

    def new_logged(self, scope: str) -> list[Logged]:
        return [lg for lg in self._new_logged if _in_scope(lg, scope)]


def rule_scopes(rule: AlertRule, view: VersionView, config: MonitorConfig) -> list[str]:
    """The scopes a rule measures: GLOBAL for a global rule, else one per value of its
    segment columns (``rule.segment_by``, default ``config.segments``) and not GLOBAL,
    which a global rule covers."""
    if rule.scope == "global":
        return [GLOBAL]
    return [s for s in view.scopes(rule.segment_by or config.segments) if s != GLOBAL]


def sizes_for(config: MonitorConfig) -> tuple[int, float]:
    """``(max_count, max_age_s)`` the windows need for ``config``'s rules.

    The count is the largest ``window``/``resolve_window`` (at least ``MIN_COUNT``); the
    age the largest ``window_s`` when every windowed rule has one, else
    ``DEFAULT_MAX_AGE_S`` (a count window must not lose samples to age).
    """
    counts = [MIN_COUNT]
    ages: list[float] = []
    count_only = False
    for rule in config.rules:
        counts += [n for n in (rule.window, rule.resolve_window) if n is not None]
        if rule.window_s is not None:
            ages.append(rule.window_s)
        elif rule.window is not None:
            count_only = True
    max_age = DEFAULT_MAX_AGE_S if count_only or not ages else max(ages)
    return max(counts), max_age


def detail_for(config: MonitorConfig) -> int:
    """How many newest logged samples per (version, scope) keep their probabilities and
    input statistics: what the rules that read them (``DETAIL_METRICS``) test, the newest
    ``drift.persistence`` adjacent windows (at least two), 0 when no rule reads them."""
    from loopline.monitor.drift import DEFAULT_WINDOW  # drift imports this module

    counts = [rule.window or DEFAULT_WINDOW for rule in config.rules
              if rule.metric in DETAIL_METRICS]  # fmt: skip
    return max(2, config.drift.persistence) * max(counts, default=0)


def _union(by_scope: dict[str, _Series[S]]) -> list[S]:
    out: dict[str, S] = {}
    for series in by_scope.values():
        out.update(series.items)
    return sorted(out.values(), key=lambda s: (s.at, s.prediction_id))


class _Table:
    """The distinct (variant, segments) of one version's samples, each stored once; a row
    holds its index."""

    def __init__(self) -> None:
        self.rows: list[list[Any]] = []
        self._index: dict[tuple[Any, ...], int] = {}

    def index(self, sample: Outcome | Logged) -> int:
        key = (sample.variant, *sorted(sample.segments.items()))
        if key not in self._index:
            self._index[key] = len(self.rows)
            self.rows.append([sample.variant, dict(sample.segments)])
        return self._index[key]


def _pack(outcomes: list[Outcome], logged: list[Logged], detailed: set[str]) -> dict[str, Any]:
    """One version's samples (each list by ``at``): times as the step from the previous
    row's, a label's time from its prediction's; details for ``detailed`` ids only."""
    table = _Table()
    labelled_rows, logged_rows = [], []
    previous = 0
    for o in outcomes:
        at = to_us(o.at)
        label_after = to_us(o.labelled_at) - at
        labelled_rows.append([o.prediction_id, at - previous, label_after, o.predicted,
                              o.actual, round(o.confidence, 6), table.index(o)])  # fmt: skip
        previous = at
    previous = 0
    for lg in logged:
        at = to_us(lg.at)
        row = [lg.prediction_id, at - previous, lg.predicted, round(lg.confidence, 6),
               table.index(lg)]  # fmt: skip
        logged_rows.append(row + _details(lg) if lg.prediction_id in detailed else row)
        previous = at
    return {"context": table.rows, "labelled": labelled_rows, "logged": logged_rows}


def _unpack(packed: dict[str, Any], version: int) -> tuple[list[Outcome], list[Logged]]:
    context = [(variant, dict(segments)) for variant, segments in packed.get("context", [])]
    outcomes, logged = [], []
    at = 0
    for pid, step, label_after, predicted, actual, conf, ctx in packed.get("labelled", []):
        at += step
        variant, segments = context[ctx]
        outcomes.append(Outcome(pid, from_us(at), from_us(at + label_after), version, variant,
                                predicted, actual, float(conf), segments))  # fmt: skip
    at = 0
    for row in packed.get("logged", []):
        pid, step, predicted, conf, ctx = row[:5]
        probs, stats = row[5:7] if len(row) > 5 else (None, None)
        at += step
        variant, segments = context[ctx]
        logged.append(Logged(pid, from_us(at), version, variant, predicted, float(conf), probs,
                             stats, segments))  # fmt: skip
    return outcomes, logged


def _details(lg: Logged) -> list[Any]:
    probs = None if lg.probabilities is None else [
        None if p is None else round(float(p), 5) for p in lg.probabilities
    ]  # fmt: skip
    stats = None if lg.input_stats is None else {
        k: round(float(v), 5) for k, v in lg.input_stats.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }  # fmt: skip
    return [probs, stats]
