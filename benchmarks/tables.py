"""One table printer for the benchmark reports: aligned plain text, or Markdown."""


def render_table(header: list[str], body: list[list[str]], markdown: bool = False) -> str:
    """``header`` and ``body`` rows as a Markdown table, or as left-aligned text columns."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *body]
    )
