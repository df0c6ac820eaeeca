"""What a preconditioner covers and what its state costs, as data and as a printable table."""

from __future__ import annotations

from dataclasses import dataclass


def _fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class LayerSummary:
    """One preconditioned layer.

    Attributes:
        name: module name in the model.
        kind: "Linear", "Conv2d", ...
        blocks: Kronecker blocks (groups of a grouped conv, else 1).
        a_shape, g_shape: shape of one block's A and G (A includes the bias coordinate).
        parameters: names of the parameters the layer preconditions.
        factor_bytes: running factors plus the statistics accumulators.
        decomposition_bytes: eigenbases and eigenvalues ("exact"; "ekfac" adds the scale S,
            one g × a matrix per block) or damped inverses and their shifts ("pi").
    """

    name: str
    kind: str
    blocks: int
    a_shape: tuple[int, int]
    g_shape: tuple[int, int]
    parameters: tuple[str, ...]
    factor_bytes: int
    decomposition_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.factor_bytes + self.decomposition_bytes


@dataclass(frozen=True)
class Summary:
    """Returned by ``KFACPreconditioner.summary()``; ``str()`` renders it as a table.

    Attributes:
        layers: one row per preconditioned layer.
        unpreconditioned: ``(parameter name, reason)`` for every trainable or frozen parameter
            the preconditioner leaves to the optimizer untouched.
    """

    layers: tuple[LayerSummary, ...]
    unpreconditioned: tuple[tuple[str, str], ...]

    @property
    def total_bytes(self) -> int:
        """Planned bytes of all preconditioner state (factors, accumulators, decompositions)."""
        return sum(row.total_bytes for row in self.layers)

    def __str__(self) -> str:
        header = ("layer", "kind", "blocks", "A", "G", "factors", "decomp.", "total")
        rows = [
            (
                r.name,
                r.kind,
                str(r.blocks),
                "x".join(map(str, r.a_shape)),
                "x".join(map(str, r.g_shape)),
                _fmt_bytes(r.factor_bytes),
                _fmt_bytes(r.decomposition_bytes),
                _fmt_bytes(r.total_bytes),
            )
            for r in self.layers
        ]
        rows.append(("total", "", "", "", "", "", "", _fmt_bytes(self.total_bytes)))
        widths = [max(len(x) for x in col) for col in zip(header, *rows)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in (header, *rows)
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.unpreconditioned:
            lines.append("")
            lines.append("left to the optimizer (not preconditioned):")
            width = max(len(name) for name, _ in self.unpreconditioned)
            lines.extend(f"  {name.ljust(width)}  {why}" for name, why in self.unpreconditioned)
        return "\n".join(lines)
