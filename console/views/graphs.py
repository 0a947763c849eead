"""Connection graphs of the last hour, from the hub's ``metrics`` ticks (about one a second).

Four stacked pyqtgraph plots with linked time axes and 1-px cosmetic pens: agents by
state, connects and disconnects per minute, authentication failures per minute, command
round trip p50/p99. They redraw at most once a second whatever the tick rate.
"""

from __future__ import annotations

import time

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QVBoxLayout, QWidget

from console.fleet import Changes, FleetModel

from .common import CONDITION_COLOURS

__all__ = ["GraphsView"]

WINDOW = 3600.0
MIN_SPAN = 60.0

# Okabe–Ito again: sky blue, vermillion, reddish purple, blue.
SERIES = [
    (
        "Agents by state",
        [
            ("online", "online", CONDITION_COLOURS["online"].name()),
            ("stale", "stale", CONDITION_COLOURS["stale"].name()),
            ("offline", "offline", CONDITION_COLOURS["offline"].name()),
            ("unknown", "unknown", CONDITION_COLOURS["unknown"].name()),
        ],
    ),
    (
        "Connects / disconnects per min",
        [
            ("connects_per_min", "connects", "#56B4E9"),
            ("disconnects_per_min", "disconnects", "#D55E00"),
        ],
    ),
    ("Auth failures per min", [("auth_failures_per_min", "auth failures", "#CC79A7")]),
    (
        "Command round trip ms",
        [("rtt_p50_ms", "p50", "#56B4E9"), ("rtt_p99_ms", "p99", "#E69F00")],
    ),
]


class GraphsView(QWidget):
    def __init__(self, fleet: FleetModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("graphs")
        self.fleet = fleet
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.canvas = pg.GraphicsLayoutWidget()
        self.canvas.ci.setContentsMargins(2, 2, 2, 2)
        self.canvas.ci.setSpacing(2)
        layout.addWidget(self.canvas)
        self.plots: list[pg.PlotItem] = []
        self.curves: dict[str, pg.PlotDataItem] = {}
        first: pg.PlotItem | None = None
        for row, (title, series) in enumerate(SERIES):
            plot = self.canvas.addPlot(
                row=row, col=0, title=title, axisItems={"bottom": pg.DateAxisItem()}
            )
            plot.setMenuEnabled(False)
            plot.setMouseEnabled(x=False, y=False)
            plot.hideButtons()
            plot.showGrid(x=True, y=True, alpha=0.15)
            plot.getAxis("left").setWidth(44)
            legend = plot.addLegend(offset=(4, 2), labelTextSize="8pt", colCount=len(series))
            legend.setBrush(pg.mkBrush(0, 0, 0, 0))
            for field, name, colour in series:
                pen = pg.mkPen(colour, width=1)
                pen.setCosmetic(True)
                self.curves[field] = plot.plot([], [], pen=pen, name=name, connect="finite")
            if first is None:
                first = plot
            else:
                plot.setXLink(first)
            self.plots.append(plot)
        self.redraws = 0
        self._dirty = False
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.redraw)
        fleet.changed.connect(self.on_changes)
        self.set_theme("dark")

    def set_theme(self, name: str) -> None:
        light = name == "light"
        background = "#fbfbf8" if light else "#161a20"
        foreground = "#333333" if light else "#c8c8c8"
        self.canvas.setBackground(background)
        for plot in self.plots:
            for axis in ("left", "bottom"):
                ax = plot.getAxis(axis)
                ax.setPen(pg.mkPen(foreground, width=1))
                ax.setTextPen(pg.mkPen(foreground))
            plot.titleLabel.setText(plot.titleLabel.text, color=foreground, size="9pt")
            if plot.legend is not None:
                plot.legend.setLabelTextColor(foreground)

    def on_changes(self, changes: Changes) -> None:
        if (changes.metrics or changes.reset) and not self._timer.isActive():
            self._timer.start(0 if self.redraws == 0 else 1000)

    def redraw(self) -> None:
        history = self.fleet.history
        now = time.time()
        since = now - WINDOW
        start = None
        top: dict[int, float] = {}
        for row, (_title, series) in enumerate(SERIES):
            for field, _name, _colour in series:
                curve = self.curves[field]
                t, v = history.series(field, since)
                if len(t) and (start is None or t[0] < start):
                    start = float(t[0])
                finite = np.isfinite(v)
                if not finite.any():
                    curve.setData([], [])
                    continue
                curve.setData(t, v)
                top[row] = max(top.get(row, 0.0), float(v[finite].max()))
        left = min(start if start is not None else now, now - MIN_SPAN)
        for row, plot in enumerate(self.plots):
            plot.setXRange(max(left, since), now, padding=0.01)
            # counts never go below zero; an all-zero series still gets a readable axis
            plot.setYRange(0, max(1.0, top.get(row, 0.0) * 1.15), padding=0)
        self.redraws += 1
