"""The fleet map: world outlines and every agent, drawn by one widget.

Agents live in numpy arrays (map position, condition rank, selected flag) updated in place
from the fleet model's batches. A paint clusters them on a grid of about
:data:`CELL_PX` screen pixels (``console.geo.cluster_points``; the grid is anchored at the
map origin and its cell snaps to powers of two, so clusters only regroup when the zoom
doubles or halves), culls to the viewport and draws one symbol per cluster: the shape and
colour of its worst member, with its size and a count when it holds more than one agent.
A paint therefore costs about the same for 100 or 20,000 agents. The outlines are one
``QPainterPath`` cached as a pixmap per view transform.

Mouse: drag to pan, wheel to zoom at the cursor, click a symbol to select its agents
(Ctrl adds), double-click a single agent to open its detail. Keys: F fit the agents,
W whole world, + and - zoom, arrows pan.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPoint, QPointF, QRectF, Qt, Signal
from PySide6.QtGui import (
    QBrush,
    QColor,
    QFont,
    QFontMetrics,
    QMouseEvent,
    QPainter,
    QPainterPath,
    QPaintEvent,
    QPen,
    QPixmap,
    QResizeEvent,
    QTransform,
    QWheelEvent,
)
from PySide6.QtWidgets import QToolTip, QWidget

from console import geo
from console.fleet import CONDITIONS, Changes, FleetModel

from .common import CONDITION_COLOURS, CONDITION_SHAPES, plain_tooltip, symbol_path

__all__ = ["CELL_PX", "MapWidget"]

#: Agents closer than about this many screen pixels share one symbol.
CELL_PX = 26.0
SINGLE_PX = 8.0
MAX_ZOOM = 400.0  # pixels per degree

THEMES = {
    "dark": {
        "sea": QColor("#12161c"),
        "land": QColor("#2a313b"),
        "coast": QColor("#3c4552"),
        "grid": QColor(255, 255, 255, 14),
        "text": QColor("#e6e6e6"),
        "halo": QColor(0, 0, 0, 200),
        "select": QColor("#56B4E9"),
        "legend_bg": QColor(18, 22, 28, 210),
    },
    "light": {
        "sea": QColor("#dfe7ef"),
        "land": QColor("#fbfbf8"),
        "coast": QColor("#9aa6b2"),
        "grid": QColor(0, 0, 0, 18),
        "text": QColor("#1b1b1b"),
        "halo": QColor(255, 255, 255, 220),
        "select": QColor("#0072B2"),
        "legend_bg": QColor(255, 255, 255, 220),
    },
}


def _where(agent: Any) -> tuple[Any, ...]:
    location = agent.view.location
    return (
        agent.view.region,
        location.lat if location else None,
        location.lon if location else None,
    )


class MapWidget(QWidget):
    agents_clicked = Signal(object, bool)  # list[str] of agent ids, additive (Ctrl)
    agent_activated = Signal(str)  # double-click on a single agent
    painted = Signal(int)  # number of agents drawn, after each paint

    def __init__(self, fleet: FleetModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("fleetMap")
        self.fleet = fleet
        self.projection = geo.Equirectangular()
        self.setMouseTracking(True)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setMinimumSize(200, 120)
        self.theme = THEMES["dark"]
        # agents
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        self.x = np.empty(0)
        self.y = np.empty(0)
        self.rank = np.empty(0, np.int64)
        self.selected = np.zeros(0, bool)
        self._where: dict[str, tuple[Any, ...]] = {}
        self._data_version = 0
        self._clusters: tuple[Any, ...] | None = None  # (key, Clusters, selected per cluster)
        # view: map units (degrees) → pixels
        self.scale = 1.0
        self.centre = QPointF(0.0, 10.0)
        self._fitted = False
        self._world_path = self._build_world_path()
        self._world_cache: tuple[Any, QPixmap] | None = None
        self._press: QPoint | None = None
        self._press_centre = QPointF()
        self._dragged = False
        self._hover: int | None = None
        self.paint_count = 0
        self.last_paint_ms = 0.0
        fleet.changed.connect(self.on_changes)

    # -- data ----------------------------------------------------------------------------

    def set_theme(self, name: str) -> None:
        self.theme = THEMES["light" if name == "light" else "dark"]
        self._world_cache = None
        self.update()

    def _build_world_path(self) -> QPainterPath:
        world = geo.load_world()
        xy = world.projected(self.projection)
        path = pg.arrayToQPath(xy[:, 0], xy[:, 1], connect=world.connect())
        path.setFillRule(Qt.FillRule.OddEvenFill)
        return path

    def on_changes(self, changes: Changes) -> None:
        if changes.reset:
            self.rebuild()
        elif not (changes.agents and self._update(changes.agents)):
            return  # heartbeats that change neither state nor place cost no repaint
        self.update()

    def rebuild(self) -> None:
        agents = list(self.fleet.agents.values())
        self.ids = [a.view.agent_id for a in agents]
        self.index = {agent_id: i for i, agent_id in enumerate(self.ids)}
        lon, lat = self._place(agents)
        self.x, self.y = self.projection.forward(lon, lat)
        self.rank = np.fromiter((a.rank for a in agents), np.int64, len(agents))
        self._where = {a.view.agent_id: _where(a) for a in agents}
        old_selected = {i for i, s in zip(self.ids, self.selected, strict=False) if s}
        self.selected = np.zeros(len(agents), bool)
        for agent_id in old_selected:
            i = self.index.get(agent_id)
            if i is not None:
                self.selected[i] = True
        self._data_version += 1
        if not self._fitted and self.width() > 0 and agents:
            self.fit()

    @staticmethod
    def _place(agents: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        return geo.place_agents(
            [a.view.agent_id for a in agents],
            [a.view.region for a in agents],
            [
                (a.view.location.lat, a.view.location.lon) if a.view.location else None
                for a in agents
            ],
        )

    def _update(self, agent_ids: set[str]) -> bool:
        """Apply changed agents; whether anything the map shows changed."""
        agents = self.fleet.agents
        new = [agents[i] for i in agent_ids if i not in self.index and i in agents]
        known = [agents[i] for i in agent_ids if i in self.index and i in agents]
        where = self._where
        rank = self.rank
        index = self.index
        known = [
            a
            for a in known
            if rank[index[a.view.agent_id]] != a.rank or where.get(a.view.agent_id) != _where(a)
        ]
        if not new and not known:
            return False
        if new:
            lon, lat = self._place(new)
            x, y = self.projection.forward(lon, lat)
            start = len(self.ids)
            for k, agent in enumerate(new):
                self.index[agent.view.agent_id] = start + k
                self.ids.append(agent.view.agent_id)
            self.x = np.concatenate((self.x, x))
            self.y = np.concatenate((self.y, y))
            self.rank = np.concatenate(
                (self.rank, np.fromiter((a.rank for a in new), np.int64, len(new)))
            )
            self.selected = np.concatenate((self.selected, np.zeros(len(new), bool)))
        if known:
            rows = np.fromiter((self.index[a.view.agent_id] for a in known), np.intp, len(known))
            self.rank[rows] = np.fromiter((a.rank for a in known), np.int64, len(known))
            moved = [a for a in known if where.get(a.view.agent_id) != _where(a)]
            if moved:  # region or location changed: place just these again
                rows = np.fromiter((self.index[a.view.agent_id] for a in moved), np.intp)
                lon, lat = self._place(moved)
                self.x[rows], self.y[rows] = self.projection.forward(lon, lat)
        for agent in (*new, *known):
            where[agent.view.agent_id] = _where(agent)
        self._data_version += 1
        return True

    def set_selected(self, ids: set[str]) -> None:
        self.selected[:] = False
        for agent_id in ids:
            i = self.index.get(agent_id)
            if i is not None:
                self.selected[i] = True
        self._data_version += 1
        self.update()

    # -- view transform ------------------------------------------------------------------

    def to_screen(self, x: Any, y: Any) -> tuple[Any, Any]:
        sx = (x - self.centre.x()) * self.scale + self.width() / 2.0
        sy = -(y - self.centre.y()) * self.scale + self.height() / 2.0
        return sx, sy

    def to_map(self, sx: float, sy: float) -> tuple[float, float]:
        x = (sx - self.width() / 2.0) / self.scale + self.centre.x()
        y = -(sy - self.height() / 2.0) / self.scale + self.centre.y()
        return x, y

    def _clamp_scale(self, scale: float) -> float:
        x0, y0, x1, y1 = self.projection.extent
        minimum = min(self.width() / (x1 - x0), self.height() / (y1 - y0)) * 0.8
        return float(min(MAX_ZOOM, max(minimum, scale)))

    def show_world(self) -> None:
        x0, y0, x1, y1 = self.projection.extent
        self._fit_rect(x0, max(y0, -60.0), x1, min(y1, 84.0), margin=0.0)

    def fit(self) -> None:
        """Fit the agents (the whole world when there are none)."""
        self._fitted = True
        if len(self.x) == 0:
            self.show_world()
            return
        x0, x1 = float(self.x.min()), float(self.x.max())
        y0, y1 = float(self.y.min()), float(self.y.max())
        pad = max(8.0, 0.08 * max(x1 - x0, y1 - y0))
        self._fit_rect(x0 - pad, y0 - pad, x1 + pad, y1 + pad, margin=0.0)

    def _fit_rect(self, x0: float, y0: float, x1: float, y1: float, margin: float) -> None:
        w, h = max(1, self.width()), max(1, self.height())
        scale = min(w / max(1e-6, x1 - x0), h / max(1e-6, y1 - y0)) * (1.0 - margin)
        self.scale = self._clamp_scale(scale)
        self.centre = QPointF((x0 + x1) / 2.0, (y0 + y1) / 2.0)
        self._world_cache = None
        self.update()

    def zoom(self, factor: float, anchor: QPointF | None = None) -> None:
        anchor = anchor or QPointF(self.width() / 2.0, self.height() / 2.0)
        ax, ay = self.to_map(anchor.x(), anchor.y())
        self.scale = self._clamp_scale(self.scale * factor)
        # keep the map point under the anchor where it was
        nx, ny = self.to_map(anchor.x(), anchor.y())
        self.centre = QPointF(self.centre.x() + ax - nx, self.centre.y() + ay - ny)
        self._world_cache = None
        self.update()

    def pan(self, dx_px: float, dy_px: float) -> None:
        self.centre = QPointF(
            self.centre.x() - dx_px / self.scale, self.centre.y() + dy_px / self.scale
        )
        self._world_cache = None
        self.update()

    # -- clustering ----------------------------------------------------------------------

    def clusters(self) -> tuple[geo.Clusters, np.ndarray]:
        cell = geo.cluster_cell_size(self.scale, CELL_PX)
        key = (self._data_version, cell)
        if self._clusters is not None and self._clusters[0] == key:
            return self._clusters[1], self._clusters[2]
        clusters = geo.cluster_points(self.x, self.y, cell, self.rank)
        picked = np.zeros(len(clusters.count), bool)
        if self.selected.any():
            picked[clusters.labels[self.selected]] = True
        self._clusters = (key, clusters, picked)
        return clusters, picked

    def cluster_at(self, pos: QPointF, radius: float = 12.0) -> int | None:
        if len(self.x) == 0:
            return None
        clusters, _ = self.clusters()
        sx, sy = self.to_screen(clusters.x, clusters.y)
        d2 = (sx - pos.x()) ** 2 + (sy - pos.y()) ** 2
        best = int(np.argmin(d2))
        size = self._symbol_size(int(clusters.count[best]))
        if d2[best] <= max(radius, size / 2 + 3) ** 2:
            return best
        return None

    def members(self, cluster: int) -> list[str]:
        clusters, _ = self.clusters()
        return [self.ids[i] for i in np.flatnonzero(clusters.labels == cluster)]

    @staticmethod
    def _symbol_size(count: int) -> float:
        if count <= 1:
            return SINGLE_PX
        return min(22.0, 10.0 + 3.0 * math.log10(count))

    # -- painting ------------------------------------------------------------------------

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        self._world_cache = None
        if not self._fitted:
            if len(self.x):
                self.fit()
            else:
                self.show_world()
                self._fitted = False

    def _world_pixmap(self) -> QPixmap:
        dpr = self.devicePixelRatioF()
        key = (self.width(), self.height(), self.scale, self.centre.x(), self.centre.y(), dpr,
               id(self.theme))  # fmt: skip
        if self._world_cache is not None and self._world_cache[0] == key:
            return self._world_cache[1]
        pixmap = QPixmap(int(self.width() * dpr), int(self.height() * dpr))
        pixmap.setDevicePixelRatio(dpr)
        theme = self.theme
        pixmap.fill(theme["sea"])
        p = QPainter(pixmap)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        transform = QTransform()
        transform.translate(self.width() / 2.0, self.height() / 2.0)
        transform.scale(self.scale, -self.scale)
        transform.translate(-self.centre.x(), -self.centre.y())
        # graticule every 30°
        p.setPen(QPen(theme["grid"], 1.0))
        for lon in range(-180, 181, 30):
            (sx, _), (sy0, sy1) = (
                self.to_screen(lon, 0),
                (self.to_screen(0, 90)[1], self.to_screen(0, -90)[1]),
            )
            p.drawLine(QPointF(sx, sy0), QPointF(sx, sy1))
        for lat in range(-60, 91, 30):
            sx0, sy = self.to_screen(-180, lat)
            sx1, _ = self.to_screen(180, lat)
            p.drawLine(QPointF(sx0, sy), QPointF(sx1, sy))
        p.setTransform(transform)
        pen = QPen(theme["coast"], 1.0)
        pen.setCosmetic(True)
        p.setPen(pen)
        p.setBrush(theme["land"])
        p.drawPath(self._world_path)
        p.end()
        self._world_cache = (key, pixmap)
        return pixmap

    def paintEvent(self, event: QPaintEvent) -> None:
        started = time.perf_counter()
        painter = QPainter(self)
        painter.drawPixmap(0, 0, self._world_pixmap())
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        drawn = 0
        if len(self.x):
            drawn = self._paint_agents(painter)
        self._paint_legend(painter)
        painter.end()
        self.paint_count += 1
        self.last_paint_ms = (time.perf_counter() - started) * 1000.0
        self.painted.emit(drawn)

    def _paint_agents(self, painter: QPainter) -> int:
        clusters, picked = self.clusters()
        sx, sy = self.to_screen(clusters.x, clusters.y)
        w, h = self.width(), self.height()
        visible = np.flatnonzero((sx > -30) & (sx < w + 30) & (sy > -30) & (sy < h + 30))
        theme = self.theme
        font = QFont(self.font())
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.85))
        font.setBold(True)
        painter.setFont(font)
        metrics = QFontMetrics(font)
        paths: dict[tuple[str, float], QPainterPath] = {}
        outline = QPen(QColor(0, 0, 0, 180), 1.0)
        select_pen = QPen(theme["select"], 2.0)
        # worst last, so the worst state is never hidden under a healthier neighbour
        order = visible[np.argsort(clusters.worst[visible], kind="stable")]
        labels: list[tuple[float, float, float, str]] = []
        counts = clusters.count
        worst = clusters.worst
        for i in order.tolist():
            count = int(counts[i])
            condition = CONDITIONS[int(worst[i])]
            size = self._symbol_size(count)
            key = (condition, size)
            path = paths.get(key)
            if path is None:
                path = paths[key] = symbol_path(CONDITION_SHAPES[condition], size)
            x, y = float(sx[i]), float(sy[i])
            painter.translate(x, y)
            if picked[i]:
                painter.setPen(select_pen)
                painter.setBrush(Qt.BrushStyle.NoBrush)
                painter.drawEllipse(QPointF(0, 0), size / 2 + 3, size / 2 + 3)
            painter.setPen(outline)
            painter.setBrush(CONDITION_COLOURS[condition])
            painter.drawPath(path)
            painter.translate(-x, -y)
            if count > 1:
                labels.append((x, y, size, f"{count:,}"))
        # counts on top of every symbol, with a halo
        halo = theme["halo"]
        text = theme["text"]
        for x, y, size, label in labels:
            tx = x + size / 2 + 2
            ty = y + metrics.ascent() / 2 - 1
            painter.setPen(halo)
            for dx, dy in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                painter.drawText(QPointF(tx + dx, ty + dy), label)
            painter.setPen(text)
            painter.drawText(QPointF(tx, ty), label)
        return int(counts[visible].sum())

    def _paint_legend(self, painter: QPainter) -> None:
        counts = self.fleet.counts
        font = QFont(self.font())
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.85))
        painter.setFont(font)
        metrics = QFontMetrics(font)
        items = [(c, f"{c} {counts.get(c, 0):,}") for c in CONDITIONS]
        width = sum(metrics.horizontalAdvance(t) + 26 for _, t in items) + 8
        height = metrics.height() + 8
        rect = QRectF(8, self.height() - height - 8, width, height)
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(QBrush(self.theme["legend_bg"]))
        painter.drawRoundedRect(rect, 4, 4)
        x = rect.left() + 8
        cy = rect.center().y()
        for condition, text in items:
            path = symbol_path(CONDITION_SHAPES[condition], 10)
            painter.translate(x + 5, cy)
            painter.setPen(QPen(QColor(0, 0, 0, 180), 1.0))
            painter.setBrush(CONDITION_COLOURS[condition])
            painter.drawPath(path)
            painter.translate(-(x + 5), -cy)
            painter.setPen(self.theme["text"])
            painter.drawText(QPointF(x + 14, cy + metrics.ascent() / 2 - 1), text)
            x += metrics.horizontalAdvance(text) + 26

    # -- interaction ---------------------------------------------------------------------

    def wheelEvent(self, event: QWheelEvent) -> None:
        steps = event.angleDelta().y() / 120.0
        if steps:
            self.zoom(1.25**steps, event.position())
        event.accept()

    def mousePressEvent(self, event: QMouseEvent) -> None:
        if event.button() == Qt.MouseButton.LeftButton:
            self._press = event.position().toPoint()
            self._press_centre = QPointF(self.centre)
            self._dragged = False
        super().mousePressEvent(event)

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        pos = event.position()
        if self._press is not None and event.buttons() & Qt.MouseButton.LeftButton:
            delta = pos.toPoint() - self._press
            if self._dragged or delta.manhattanLength() > 4:
                self._dragged = True
                self.centre = QPointF(
                    self._press_centre.x() - delta.x() / self.scale,
                    self._press_centre.y() + delta.y() / self.scale,
                )
                self._world_cache = None
                self.update()
                return
        cluster = self.cluster_at(pos)
        if cluster != self._hover:
            self._hover = cluster
            if cluster is None:
                QToolTip.hideText()
            else:
                QToolTip.showText(
                    event.globalPosition().toPoint(), plain_tooltip(self.describe(cluster)), self
                )

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:
        if event.button() == Qt.MouseButton.LeftButton and self._press is not None:
            if not self._dragged:
                cluster = self.cluster_at(event.position())
                additive = bool(event.modifiers() & Qt.KeyboardModifier.ControlModifier)
                ids = self.members(cluster) if cluster is not None else []
                self.agents_clicked.emit(ids, additive)
            self._press = None
            self._dragged = False
        super().mouseReleaseEvent(event)

    def mouseDoubleClickEvent(self, event: QMouseEvent) -> None:
        cluster = self.cluster_at(event.position())
        if cluster is not None:
            members = self.members(cluster)
            if len(members) == 1:
                self.agent_activated.emit(members[0])
                return
        self.zoom(2.0, event.position())

    def keyPressEvent(self, event: Any) -> None:
        key = event.key()
        if key == Qt.Key.Key_F:
            self.fit()
        elif key in (Qt.Key.Key_W, Qt.Key.Key_Home):
            self.show_world()
        elif key in (Qt.Key.Key_Plus, Qt.Key.Key_Equal):
            self.zoom(1.5)
        elif key == Qt.Key.Key_Minus:
            self.zoom(1 / 1.5)
        elif key == Qt.Key.Key_Left:
            self.pan(60, 0)
        elif key == Qt.Key.Key_Right:
            self.pan(-60, 0)
        elif key == Qt.Key.Key_Up:
            self.pan(0, 60)
        elif key == Qt.Key.Key_Down:
            self.pan(0, -60)
        else:
            super().keyPressEvent(event)

    def describe(self, cluster: int) -> str:
        """Tooltip text (plain): one agent's facts, or a cluster's counts and regions."""
        members = self.members(cluster)
        agents = self.fleet.agents
        if len(members) == 1:
            agent = agents.get(members[0])
            if agent is None:
                return members[0]
            v = agent.view
            lines = [v.agent_id]
            if v.hostname:
                lines.append(v.hostname)
            lines.append(" · ".join(p for p in (v.region, v.platform, v.version) if p))
            state = agent.condition if v.status in (None, "ok") else f"{v.state} ({v.status})"
            lines.append(state)
            return "\n".join(lines)
        per: dict[str, int] = {}
        regions: dict[str, int] = {}
        for agent_id in members:
            agent = agents.get(agent_id)
            if agent is None:
                continue
            per[agent.condition] = per.get(agent.condition, 0) + 1
            regions[agent.view.region or "(no region)"] = (
                regions.get(agent.view.region or "(no region)", 0) + 1
            )
        top = sorted(regions.items(), key=lambda kv: -kv[1])[:3]
        lines = [f"{len(members):,} agents"]
        lines.append(", ".join(f"{c} {per[c]:,}" for c in reversed(CONDITIONS) if per.get(c)))
        lines.append(", ".join(f"{r} ({n:,})" for r, n in top))
        lines.append("click to select them")
        return "\n".join(lines)
