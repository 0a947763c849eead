"""The cluster as a graph: Redis in the middle, each hub a node on it, its agents beneath.

Drawn with QPainter from what the topology view already counts (agents per hub, region and
condition) and the fleet's :meth:`~console.fleet.FleetModel.hub_infos` (each hub's lease,
agent count, limit and loop lag), so it costs nothing per heartbeat: it repaints when the
topology refreshes, at most twice a second.

A hub whose lease lapsed is drawn red, its link to Redis dashed, and its agents — ``unknown``
until they register elsewhere — as grey diamonds beneath it: a dead hub is seen at a glance,
and in grey scale too (shape and the word *DOWN*, not colour alone). Agents are one symbol
each while they fit, else one symbol for several (the legend says how many).
"""

from __future__ import annotations

import math

from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QFont, QMouseEvent, QPainter, QPaintEvent, QPen, QResizeEvent
from PySide6.QtWidgets import QWidget

from console.fleet import CONDITIONS, HubInfo

from .common import CONDITION_COLOURS, CONDITION_SHAPES, symbol_path

__all__ = ["THEMES", "ClusterGraph"]

THEMES = {
    "dark": {
        "background": QColor("#12161c"),
        "panel": QColor("#1f252d"),
        "border": QColor("#3c4552"),
        "text": QColor("#e6e6e6"),
        "muted": QColor("#9aa3ad"),
        "link": QColor("#4a5563"),
    },
    "light": {
        "background": QColor("#f4f6f8"),
        "panel": QColor("#ffffff"),
        "border": QColor("#9aa6b2"),
        "text": QColor("#1b1b1b"),
        "muted": QColor("#5b6570"),
        "link": QColor("#9aa6b2"),
    },
}
UP = CONDITION_COLOURS["online"]
DOWN = CONDITION_COLOURS["offline"]
#: Geometry, in pixels.
REDIS_SIZE = (170.0, 46.0)
HUB_HEIGHT = 84.0
HUB_TOP = 96.0
DOT = 7.0
DOT_STEP = 9.0
DOT_ROWS = 6
MIN_HEIGHT = 320


class ClusterGraph(QWidget):
    """Hubs around Redis; click a hub to list its agents (``hub_clicked``)."""

    hub_clicked = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("clusterGraph")
        self.setMinimumHeight(MIN_HEIGHT)
        self.setMouseTracking(False)
        self.theme = THEMES["dark"]
        self.redis_state: str | None = None
        self.this_hub: str | None = None
        self.hubs: list[HubInfo] = []
        #: Per hub: agents per condition, and per region (largest first).
        self.counts: dict[str, dict[str, int]] = {}
        self.regions: dict[str, list[tuple[str, dict[str, int]]]] = {}
        self.hub_rects: dict[str, QRectF] = {}
        self.redis_rect = QRectF()

    def set_theme(self, name: str) -> None:
        self.theme = THEMES["light" if name == "light" else "dark"]
        self.update()

    def set_data(
        self,
        redis_state: str | None,
        hubs: list[HubInfo],
        counts: dict[tuple[str, str], dict[str, int]],
        this_hub: str | None = None,
    ) -> None:
        """Redis's state, the hubs, the topology's counts per (hub, region), and the hub
        this console is on (its node says so)."""
        self.redis_state = redis_state
        self.this_hub = this_hub
        self.hubs = hubs
        per_hub: dict[str, dict[str, int]] = {}
        regions: dict[str, list[tuple[str, dict[str, int]]]] = {}
        for (hub, region), per in counts.items():
            total = per_hub.setdefault(hub, dict.fromkeys(CONDITIONS, 0))
            for condition, n in per.items():
                total[condition] += n
            regions.setdefault(hub, []).append((region, per))
        for rows in regions.values():
            rows.sort(key=lambda row: (-sum(row[1].values()), row[0]))
        self.counts = per_hub
        self.regions = regions
        self.layout_nodes()
        self.update()

    def layout_nodes(self) -> None:
        """Place Redis at the top centre and the hubs in a row beneath it."""
        width = float(self.width())
        self.redis_rect = QRectF((width - REDIS_SIZE[0]) / 2, 12.0, *REDIS_SIZE)
        column = width / max(1, len(self.hubs))
        box_width = max(120.0, min(column - 16.0, 300.0))
        self.hub_rects = {
            hub.hub_id: QRectF(
                column * i + (column - box_width) / 2, HUB_TOP, box_width, HUB_HEIGHT
            )
            for i, hub in enumerate(self.hubs)
        }

    def resizeEvent(self, event: QResizeEvent) -> None:
        self.layout_nodes()
        super().resizeEvent(event)

    def hub_at(self, point: QPointF) -> str | None:
        for hub_id, rect in self.hub_rects.items():
            if rect.contains(point):
                return hub_id
        return None

    def mousePressEvent(self, event: QMouseEvent) -> None:
        hub_id = self.hub_at(event.position())
        if hub_id is not None:
            self.hub_clicked.emit(hub_id)
        super().mousePressEvent(event)

    # -- painting ------------------------------------------------------------------------

    def paintEvent(self, _event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.fillRect(self.rect(), self.theme["background"])
        self.layout_nodes()
        redis = self.redis_rect
        for hub in self.hubs:
            self._link(painter, redis, self.hub_rects[hub.hub_id], hub.state == "down")
        self._redis(painter, redis)
        for hub in self.hubs:
            rect = self.hub_rects[hub.hub_id]
            self._hub(painter, rect, hub)
            bottom = self._agents(painter, rect, self.counts.get(hub.hub_id, {}))
            self._regions(painter, rect, bottom, self.regions.get(hub.hub_id, []))
        painter.end()

    def _link(self, painter: QPainter, redis: QRectF, rect: QRectF, down: bool) -> None:
        pen = QPen(DOWN if down else self.theme["link"], 2.0)
        if down:
            pen.setStyle(Qt.PenStyle.DashLine)
        painter.setPen(pen)
        painter.drawLine(
            QPointF(redis.center().x(), redis.bottom()), QPointF(rect.center().x(), rect.top())
        )

    def _redis(self, painter: QPainter, rect: QRectF) -> None:
        theme = self.theme
        up = self.redis_state == "up"
        painter.setPen(QPen(UP if up else DOWN, 2.0))
        painter.setBrush(theme["panel"])
        painter.drawRoundedRect(rect, 10, 10)
        self._text(painter, rect.adjusted(0, 4, 0, -rect.height() / 2), "Redis", bold=True)
        state = "up" if up else f"{self.redis_state or 'unknown'}".upper()
        self._text(
            painter,
            rect.adjusted(0, rect.height() / 2, 0, -4),
            f"shared state: {state}",
            colour=theme["muted"] if up else DOWN,
        )

    def _hub(self, painter: QPainter, rect: QRectF, hub: HubInfo) -> None:
        theme = self.theme
        down = hub.state == "down"
        painter.setPen(QPen(DOWN if down else UP, 3.0 if down else 1.5))
        fill = QColor(DOWN) if down else QColor(theme["panel"])
        if down:
            fill.setAlpha(90)
        painter.setBrush(fill)
        painter.drawRoundedRect(rect, 8, 8)
        line = (rect.height() - 10) / 4
        rows = [QRectF(rect.left() + 8, rect.top() + 2 + k * line, rect.width() - 16, line)
                for k in range(4)]  # fmt: skip
        counts = self.counts.get(hub.hub_id, {})
        known = sum(counts.values())
        title = f"{'★ ' if hub.leader else ''}{hub.hub_id}"
        if hub.hub_id == self.this_hub:
            title += "  · this console"
        self._text(painter, rows[0], title, bold=True)
        if down:
            self._text(painter, rows[1], "✖ DOWN — lease lapsed", colour=DOWN, bold=True)
            unknown = counts.get("unknown", 0)
            if unknown:
                self._text(painter, rows[2], f"{unknown:,} agents unknown")
                self._text(painter, rows[3], "until they register elsewhere",
                           colour=theme["muted"])  # fmt: skip
            else:
                self._text(painter, rows[2], "no agent left behind")
                self._text(painter, rows[3], "(they registered elsewhere)", colour=theme["muted"])
            return
        lag = "" if hub.lag_ms is None else f" · lag {hub.lag_ms:.1f} ms"
        self._text(painter, rows[1], f"● lease ok{' · leader' if hub.leader else ''}{lag}",
                   colour=UP)  # fmt: skip
        online = counts.get("online", 0) + counts.get("degraded", 0)
        self._text(painter, rows[2], f"{hub.agents:,} connected · {online:,} of {known:,} online")
        load = hub.load
        self._text(
            painter,
            rows[3],
            "load: no limit" if load is None else f"load {load:.0%} of {hub.max_agents:,}",
            colour=theme["muted"],
        )
        if load is not None:
            bar = QRectF(rect.left() + 8, rect.bottom() - 8, rect.width() - 16, 3)
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(theme["border"])
            painter.drawRect(bar)
            busy = CONDITION_COLOURS["stale"] if load > 0.7 else UP
            painter.setBrush(DOWN if load > 0.9 else busy)
            painter.drawRect(QRectF(bar.left(), bar.top(), bar.width() * min(1.0, load), 3))

    def _agents(self, painter: QPainter, rect: QRectF, counts: dict[str, int]) -> float:
        """One symbol per agent (or per several) beneath the hub; returns the bottom."""
        total = sum(counts.values())
        top = rect.bottom() + 10
        if total == 0:
            return top
        per_row = max(1, int((rect.width() - 4) // DOT_STEP))
        capacity = per_row * DOT_ROWS
        each = max(1, math.ceil(total / capacity))
        symbols: list[str] = []
        for condition in CONDITIONS:
            symbols += [condition] * math.ceil(counts.get(condition, 0) / each)
        painter.setPen(Qt.PenStyle.NoPen)
        paths = {c: symbol_path(CONDITION_SHAPES[c], DOT) for c in CONDITIONS}
        for i, condition in enumerate(symbols[:capacity]):
            x = rect.left() + 2 + DOT_STEP / 2 + (i % per_row) * DOT_STEP
            y = top + DOT_STEP / 2 + (i // per_row) * DOT_STEP
            painter.setBrush(CONDITION_COLOURS[condition])
            painter.drawPath(paths[condition].translated(x, y))
        rows = math.ceil(min(len(symbols), capacity) / per_row)
        bottom = top + rows * DOT_STEP + 2
        if each > 1:
            legend = QRectF(rect.left(), bottom, rect.width(), 14)
            self._text(painter, legend, f"one symbol = {each} agents", colour=self.theme["muted"],
                       small=True)  # fmt: skip
            bottom += 14
        return bottom

    def _regions(
        self,
        painter: QPainter,
        rect: QRectF,
        top: float,
        regions: list[tuple[str, dict[str, int]]],
    ) -> None:
        """The hub's regions, largest first, each with its count and a bar by condition."""
        row = 16.0
        room = int((self.height() - top - 4) // row)
        if room <= 0 or not regions:
            return
        shown = regions if len(regions) <= room else regions[: max(0, room - 1)]
        theme = self.theme
        for k, (region, per) in enumerate(shown):
            y = top + k * row
            total = sum(per.values())
            label = QRectF(rect.left(), y, rect.width() * 0.55, row)
            self._text(painter, label, region, align=Qt.AlignmentFlag.AlignLeft, small=True)
            number = QRectF(rect.left() + rect.width() * 0.55, y, rect.width() * 0.15, row)
            self._text(painter, number, f"{total:,}", align=Qt.AlignmentFlag.AlignRight,
                       small=True)  # fmt: skip
            bar_left = rect.left() + rect.width() * 0.73
            bar_width = rect.width() * 0.27
            x = bar_left
            painter.setPen(Qt.PenStyle.NoPen)
            for condition in CONDITIONS:
                n = per.get(condition, 0)
                if not n or not total:
                    continue
                w = bar_width * n / total
                painter.setBrush(CONDITION_COLOURS[condition])
                painter.drawRect(QRectF(x, y + 4, w, row - 8))
                x += w
        if len(shown) < len(regions):
            y = top + len(shown) * row
            more = len(regions) - len(shown)
            self._text(
                painter,
                QRectF(rect.left(), y, rect.width(), row),
                f"+{more} more region{'s' if more > 1 else ''}",
                colour=theme["muted"],
                align=Qt.AlignmentFlag.AlignLeft,
                small=True,
            )

    def _text(
        self,
        painter: QPainter,
        rect: QRectF,
        text: str,
        *,
        colour: QColor | None = None,
        bold: bool = False,
        small: bool = False,
        align: Qt.AlignmentFlag = Qt.AlignmentFlag.AlignHCenter,
    ) -> None:
        font = QFont(self.font())
        font.setBold(bold)
        if small:
            font.setPointSizeF(font.pointSizeF() * 0.9)
        painter.setFont(font)
        painter.setPen(colour or self.theme["text"])
        elided = painter.fontMetrics().elidedText(
            text, Qt.TextElideMode.ElideRight, int(rect.width())
        )
        painter.drawText(rect, int(align | Qt.AlignmentFlag.AlignVCenter), elided)
