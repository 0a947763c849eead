"""Small tables of hub objects (alerts, jobs, commands): one list-backed model, one view setup.

The agents table has its own model (20,000 rows, its own sort and filter); these tables hold
at most a few hundred rows, replaced whole when the fleet model changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QTableView

__all__ = ["Index", "ListTableModel", "make_table", "short_time"]

Index = QModelIndex | QPersistentModelIndex
Row = TypeVar("Row")


def short_time(text: str | None) -> str:
    """``2026-11-28T12:00:00.123Z`` as ``2026-11-28 12:00:00``."""
    return text.replace("T", " ")[:19] if text else ""


class ListTableModel(QAbstractTableModel, Generic[Row]):
    """Rows in a list, one column per entry of ``columns``; subclasses say what a cell shows.

    ``row_key`` (when set) names each row: a new list with the same keys in the same order
    updates the cells in place instead of resetting the model, so a selection survives.
    """

    columns: ClassVar[Sequence[str]] = ()
    row_key: ClassVar[Callable[[Any], str] | None] = None

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.rows: list[Row] = []

    def set_rows(self, rows: list[Row]) -> None:
        key = type(self).row_key
        if key is not None and [key(r) for r in rows] == [key(r) for r in self.rows]:
            self.rows = rows
            if rows:
                self.dataChanged.emit(
                    self.index(0, 0), self.index(len(rows) - 1, len(self.columns) - 1)
                )
            return
        self.beginResetModel()
        self.rows = rows
        self.endResetModel()

    def row_at(self, index: Index) -> Row | None:
        if not index.isValid() or index.row() >= len(self.rows):
            return None
        return self.rows[index.row()]

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.columns)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = 0) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return self.columns[section]
        return None


def make_table(
    model: QAbstractTableModel,
    widths: Sequence[int],
    selection: QAbstractItemView.SelectionMode = QAbstractItemView.SelectionMode.SingleSelection,
) -> QTableView:
    """A compact, row-selecting table: no grid, alternating rows, one text line per row."""
    view = QTableView()
    view.setModel(model)
    view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    view.setSelectionMode(selection)
    view.setWordWrap(False)
    view.setShowGrid(False)
    view.setAlternatingRowColors(True)
    view.verticalHeader().setVisible(False)
    view.verticalHeader().setDefaultSectionSize(view.fontMetrics().height() + 4)
    header = view.horizontalHeader()
    header.setStretchLastSection(True)
    header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
    for column, width in enumerate(widths):
        header.resizeSection(column, width)
    return view
