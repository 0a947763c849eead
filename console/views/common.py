"""What every view shares: condition colours and shapes, plain-text helpers, small formats.

Status is shown by colour **and** shape (Okabe–Ito colours, distinct silhouettes), so it
reads in grey scale and for colour-blind people. Everything an agent sent (hostnames,
labels, errors, output) is shown as plain text: labels get ``Qt.PlainText``, tooltips are
fully escaped, output goes into plain-text editors.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable
from functools import lru_cache

from PySide6.QtCore import QPointF, Qt
from PySide6.QtGui import (
    QColor,
    QFont,
    QKeySequence,
    QPainter,
    QPainterPath,
    QPen,
    QPixmap,
    QPolygonF,
    QShortcut,
)
from PySide6.QtWidgets import QLabel, QWidget

from console.fleet import CONDITIONS

__all__ = [
    "CONDITION_COLOURS",
    "CONDITION_SHAPES",
    "SEVERITY_COLOURS",
    "format_age",
    "format_count",
    "plain_label",
    "plain_tooltip",
    "symbol_path",
    "symbol_pixmap",
]

# Okabe–Ito: bluish green, grey, yellow, orange, vermillion.
CONDITION_COLOURS: dict[str, QColor] = {
    "online": QColor("#009E73"),
    "unknown": QColor("#9A9A9A"),
    "degraded": QColor("#F0E442"),
    "stale": QColor("#E69F00"),
    "offline": QColor("#D55E00"),
}
CONDITION_SHAPES = {
    "online": "circle",
    "unknown": "diamond",
    "degraded": "triangle",
    "stale": "square",
    "offline": "cross",
}
CONDITION_GLYPHS = {
    "online": "●",
    "unknown": "◆",
    "degraded": "▲",
    "stale": "■",
    "offline": "✖",
}
SEVERITY_COLOURS: dict[str, QColor] = {
    "info": QColor("#56B4E9"),
    "warning": QColor("#E69F00"),
    "critical": QColor("#D55E00"),
}
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


def symbol_path(shape: str, size: float) -> QPainterPath:
    """A filled symbol of about ``size`` pixels, centred on (0, 0)."""
    r = size / 2.0
    path = QPainterPath()
    if shape == "circle":
        path.addEllipse(QPointF(0, 0), r * 0.92, r * 0.92)
    elif shape == "square":
        s = r * 0.8
        path.addRect(-s, -s, 2 * s, 2 * s)
    elif shape == "diamond":
        path.addPolygon(QPolygonF([QPointF(0, -r), QPointF(r, 0), QPointF(0, r), QPointF(-r, 0)]))
        path.closeSubpath()
    elif shape == "triangle":
        h = r * math.sqrt(3) / 2
        path.addPolygon(QPolygonF([QPointF(0, -r), QPointF(r, h * 0.9), QPointF(-r, h * 0.9)]))
        path.closeSubpath()
    else:  # cross: an X of two thick bars, as one outline
        w = r * 0.32
        pts = []
        for k in range(4):
            a = math.pi / 4 + k * math.pi / 2
            ca, sa = math.cos(a), math.sin(a)
            # each arm: two points at the tip, then the notch between arms
            pts += [
                QPointF(r * ca - w * -sa, r * sa - w * ca),
                QPointF(r * ca + w * -sa, r * sa + w * ca),
            ]
            b = a + math.pi / 4
            pts.append(QPointF(w * math.sqrt(2) * math.cos(b), w * math.sqrt(2) * math.sin(b)))
        path.addPolygon(QPolygonF(pts))
        path.closeSubpath()
    return path


def paint_symbol(painter: QPainter, condition: str, x: float, y: float, size: float) -> None:
    path = symbol_path(CONDITION_SHAPES.get(condition, "circle"), size)
    painter.save()
    painter.translate(x, y)
    painter.setPen(QPen(QColor(0, 0, 0, 170), 1.0))
    painter.setBrush(CONDITION_COLOURS.get(condition, CONDITION_COLOURS["unknown"]))
    painter.drawPath(path)
    painter.restore()


@lru_cache(maxsize=64)
def symbol_pixmap(condition: str, size: int = 12, dpr: float = 1.0) -> QPixmap:
    pixmap = QPixmap(math.ceil(size * dpr), math.ceil(size * dpr))
    pixmap.setDevicePixelRatio(dpr)
    pixmap.fill(Qt.GlobalColor.transparent)
    painter = QPainter(pixmap)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    paint_symbol(painter, condition, size / 2, size / 2, size - 2)
    painter.end()
    return pixmap


def shortcut(
    keys: str | QKeySequence | Qt.Key,
    parent: QWidget,
    slot: Callable[[], object],
    context: Qt.ShortcutContext = Qt.ShortcutContext.WindowShortcut,
) -> QShortcut:
    """A keyboard shortcut calling ``slot`` (signal wiring: no callable overloads)."""
    sc = QShortcut(QKeySequence(keys), parent)
    sc.setContext(context)
    sc.activated.connect(slot)
    return sc


def plain_tooltip(text: str) -> str:
    """A tooltip that shows ``text`` literally: escaped, so agent strings can't inject HTML."""
    body = html.escape(text, quote=True).replace("\n", "<br>")
    return f"<qt><span style='white-space:pre'>{body}</span></qt>"


def plain_label(text: str = "", parent: QWidget | None = None) -> QLabel:
    label = QLabel(parent)
    label.setTextFormat(Qt.TextFormat.PlainText)
    label.setText(text)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


def format_age(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "—"
    seconds = max(0.0, (now if now is not None else time.time()) - ts)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def format_count(n: int) -> str:
    return f"{n:,}"


def monospace_font() -> QFont:
    font = QFont("DejaVu Sans Mono")
    font.setStyleHint(QFont.StyleHint.Monospace)
    return font


def all_conditions() -> tuple[str, ...]:
    return CONDITIONS
