#!/usr/bin/env python3
"""Puts two benchmark reports (the Markdown that benches/run.sh writes) side by side.

    benches/compare.py CURRENT PREVIOUS > comparison.md

Every table row of CURRENT is matched with the row of PREVIOUS in the section of the same
title whose first cell is the same once measured numbers (100 or more) and parenthesized details
are set aside (so "fell behind (p99 292): 1 node(s), 3000 events/s" matches "fell behind
(delivered 85 %): 1 node(s), 4000 events/s", but not the same row of 2 node(s)); each cell that differs shows the previous
value after it: `6,951 (was 8,014)`. A row with no previous counterpart says so in its first
cell; a previous row with no current counterpart is listed at the end of its section, so nothing
that was measured before disappears silently. Text outside tables is copied from CURRENT.
"""

import re
import sys

DIGITS = re.compile(r"[0-9]+(?:[,.][0-9]+)*")
PARENTHESIZED = re.compile(r"\([^()]*\)")


def measured(number):
    """A number that varies between runs (a rate, a size: 100 or more, or with a separator), as
    opposed to a count that names the scenario (2 nodes, 4 workers, claims of 16)."""
    text = number.group(0)
    return "#" if ("," in text or "." in text or int(text) >= 100) else text


def row_key(cell):
    # Parenthesized detail (a verdict's reasons, "median of 3") and measured numbers vary between
    # runs; small counts stay, so "2 node(s)" and "3 node(s)" remain different rows.
    plain = PARENTHESIZED.sub("", cell.replace("**", ""))
    return " ".join(DIGITS.sub(measured, plain).split())


def cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def is_rule(line):
    return bool(re.fullmatch(r"\|?[\s:|-]+\|?", line.strip())) and "-" in line


def sections(text):
    """Section title -> list of (key, cells) for its table rows (header and rule excluded)."""
    result = {}
    title = ""
    header_seen = False
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip()
            header_seen = False
            continue
        if not line.startswith("|"):
            header_seen = False
            continue
        if is_rule(line):
            header_seen = True
            continue
        if not header_seen:
            continue
        row = cells(line)
        result.setdefault(title, []).append((row_key(row[0]), row))
    return result


def merged(current_row, previous_row):
    out = []
    for index, cell in enumerate(current_row):
        before = previous_row[index] if index < len(previous_row) else ""
        if before in ("", cell):
            out.append(cell)
        else:
            out.append(f"{cell} (was {before})")
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: compare.py CURRENT PREVIOUS")
    with open(sys.argv[1], encoding="utf-8") as current_file:
        current = current_file.read()
    with open(sys.argv[2], encoding="utf-8") as previous_file:
        previous = previous_file.read()
    previous_rows = sections(previous)
    used = set()
    title = ""
    header_seen = False
    output = []

    def end_section():
        # What the previous report measured in this section and this run did not.
        gone = [
            row
            for index, (_, row) in enumerate(previous_rows.get(title, []))
            if (title, index) not in used
        ]
        if gone:
            output.append("")
            output.append("Measured before, not in this run:")
            output.append("")
            output.extend(f"- {' | '.join(row)}" for row in gone)
            output.append("")

    for line in current.splitlines():
        if line.startswith("#"):
            end_section()
            title = line.lstrip("#").strip()
            header_seen = False
            output.append(line)
            continue
        if not line.startswith("|"):
            header_seen = False
            output.append(line)
            continue
        if is_rule(line):
            header_seen = True
            output.append(line)
            continue
        if not header_seen:
            output.append(line)
            continue
        row = cells(line)
        key = row_key(row[0])
        match = None
        for index, (previous_key, previous_row) in enumerate(previous_rows.get(title, [])):
            if previous_key == key and (title, index) not in used:
                used.add((title, index))
                match = previous_row
                break
        row = [f"{row[0]} (new)"] + row[1:] if match is None else merged(row, match)
        output.append("| " + " | ".join(row) + " |")
    end_section()
    print("\n".join(output))


if __name__ == "__main__":
    main()
