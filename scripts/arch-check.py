#!/usr/bin/env python3
"""The architecture's limits, measured from the checkout (docs/ARCHITECTURE.md, "Limits").

Prints one line per measure with its limit, then the offenders; exits 1 when a limit is broken.

    scripts/arch-check.py          # measure and check
    scripts/arch-check.py --json   # the figures as JSON (for notes and before/after comparisons)

Measures:
- lines of each binary's sources (archive-agent/, restore-agent/): at most 500 each;
- println!/print!/json! in the binaries (the report layer prints): counted, at most 2 each;
- the longest function anywhere in shared/src and the binaries: at most 100 lines;
- the longest library file before its tests (`#[cfg(test)]`): at most 1,000 lines;
- functions in shared/src returning `Result<_, String>`: none;
- import circles between the library's modules (a module and its own submodules excepted): none;
- core modules importing from `commands/` or `cli/` (the layers above them): none;
- `commands/` importing from `cli/`, or `cli/` implementing `Report` (cli parses flags into a
  command's options and hands over; rendering lives with the report types): none;
- two library modules with the same name at different depths (`spool` beside `prefetch::spool`):
  none; the same phase name under two commands (`restore::plan`, `drill::plan`) is allowed.
"""
import json
import os
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LIB = os.path.join(ROOT, "shared", "src")
BINS = ["archive-agent", "restore-agent"]

LIMITS = {
    "binary_lines": 500,
    "binary_prints": 2,
    "function_lines": 100,
    "library_file_lines": 1000,
    "result_string": 0,
    "import_circles": 0,
    "alike_modules": 0,
    "layer_violations": 0,
}

# The commands (what a user runs) sit over the core; `cli` (flags to a command's options) sits
# over the commands, beside the binaries. No core module may import from either.
UPPER = ("commands", "cli")


def rust_files(top):
    for dirpath, _, names in os.walk(top):
        for n in sorted(names):
            if n.endswith(".rs"):
                yield os.path.join(dirpath, n)


def strip_code(text):
    """The text with comments, strings and char literals blanked (newlines kept), so that braces
    and words are counted in code only."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 40]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            end = '"' + m.group(1)
            j = text.find(end, i + len(m.group(0)))
            j = n if j < 0 else j + len(end)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "'":
            # A char literal ('x', '\n', '\u{..}'), not a lifetime ('a).
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:i + 12])
            if m:
                out.append(" " * len(m.group(0)))
                i += len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


FN_RE = re.compile(r"\bfn\s+([A-Za-z_][A-Za-z0-9_]*)")


def functions(path):
    """(name, first line, line count) of every function with a body in the file."""
    code = strip_code(open(path, encoding="utf-8").read())
    found = []
    for m in FN_RE.finditer(code):
        # The body starts at the first `{` after the signature, unless a `;` ends it first.
        j = m.end()
        depth_paren = 0
        while j < len(code):
            ch = code[j]
            if ch in "(<[":
                depth_paren += 1
            elif ch in ")>]":
                depth_paren -= 1
            elif ch == ";" and depth_paren <= 0:
                j = -1
                break
            elif ch == "{" and depth_paren <= 0:
                break
            j += 1
        if j < 0 or j >= len(code):
            continue
        depth, k = 0, j
        while k < len(code):
            if code[k] == "{":
                depth += 1
            elif code[k] == "}":
                depth -= 1
                if depth == 0:
                    break
            k += 1
        first = code.count("\n", 0, m.start()) + 1
        last = code.count("\n", 0, k) + 1
        found.append((m.group(1), first, last - first + 1))
    return found


def lines_before_tests(path):
    lines = open(path, encoding="utf-8").read().split("\n")
    for i, l in enumerate(lines):
        if l.strip() == "#[cfg(test)]" and i + 1 < len(lines) and re.match(r"\s*(pub(\(crate\))? )?mod \w+", lines[i + 1]):
            return i
    return len(lines) - (1 if lines and lines[-1] == "" else 0)


def module_of(path):
    rel = os.path.relpath(path, LIB)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib"):
        rel = rel[:-1]
    return tuple(rel)


def import_graph():
    mods = {module_of(p): p for p in rust_files(LIB)}
    edges = {m: set() for m in mods}
    for m, p in mods.items():
        code = strip_code(open(p, encoding="utf-8").read())
        # Only the code before the tests: tests may reach anywhere.
        cut = lines_before_tests(p)
        code = "\n".join(code.split("\n")[:cut])
        refs = set()
        for r in re.finditer(r"\bcrate::((?:[a-z_][a-z0-9_]*::)*[a-z_][a-z0-9_]*)", code):
            refs.add(tuple(r.group(1).split("::")))
        # `use crate::{a, b::c}` groups.
        for g in re.finditer(r"\bcrate::\{([^}]*)\}", code):
            for part in g.group(1).split(","):
                part = part.strip().split("::")
                if part and part[0]:
                    refs.add(tuple(x.strip() for x in part if x.strip()))
        # `super::x` from a submodule.
        for r in re.finditer(r"\bsuper::((?:[a-z_][a-z0-9_]*::)*[a-z_][a-z0-9_]*)", code):
            base = m[:-1] if os.path.basename(p) not in ("mod.rs",) else m[:-1]
            refs.add(base + tuple(r.group(1).split("::")))
        for ref in refs:
            # The longest module the path names.
            target = None
            for k in range(len(ref), 0, -1):
                if ref[:k] in mods:
                    target = ref[:k]
                    break
            if target is None or target == m:
                continue
            # A module and its ancestors or descendants belong together.
            if target[: len(m)] == m or m[: len(target)] == target:
                continue
            edges[m].add(target)
    return edges


def circles(edges):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted("::".join(c) or "crate" for c in comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def main():
    as_json = "--json" in sys.argv[1:]
    fig = {}
    broken = []

    fig["binary_lines"] = {}
    fig["binary_prints"] = {}
    for b in BINS:
        total, prints = 0, 0
        for p in rust_files(os.path.join(ROOT, b, "src")):
            text = open(p, encoding="utf-8").read()
            total += text.count("\n")
            prints += len(re.findall(r"\b(println!|print!|json!)", strip_code(text)))
        fig["binary_lines"][b] = total
        fig["binary_prints"][b] = prints
        if total > LIMITS["binary_lines"]:
            broken.append(f"{b}: {total} lines (limit {LIMITS['binary_lines']})")
        if prints > LIMITS["binary_prints"]:
            broken.append(f"{b}: {prints} println!/print!/json! (limit {LIMITS['binary_prints']})")

    long_fns = []
    for top in [LIB] + [os.path.join(ROOT, b, "src") for b in BINS]:
        for p in rust_files(top):
            cut = lines_before_tests(p) if top == LIB else 10**9
            for name, first, count in functions(p):
                if first <= cut:
                    long_fns.append((count, os.path.relpath(p, ROOT), first, name))
    long_fns.sort(reverse=True)
    fig["longest_functions"] = [f"{c} {p}:{l} {n}" for c, p, l, n in long_fns[:10]]
    fig["functions_over_limit"] = sum(1 for c, *_ in long_fns if c > LIMITS["function_lines"])
    for c, p, l, n in long_fns:
        if c > LIMITS["function_lines"]:
            broken.append(f"{p}:{l} fn {n}: {c} lines (limit {LIMITS['function_lines']})")

    files = sorted(((lines_before_tests(p), os.path.relpath(p, ROOT)) for p in rust_files(LIB)), reverse=True)
    fig["longest_library_files"] = [f"{n} {p}" for n, p in files[:10]]
    for n, p in files:
        if n > LIMITS["library_file_lines"]:
            broken.append(f"{p}: {n} lines before its tests (limit {LIMITS['library_file_lines']})")

    rs = []
    for p in rust_files(LIB):
        code = strip_code(open(p, encoding="utf-8").read())
        for m in re.finditer(r"Result<[^;{}]*?,\s*String\s*>", code):
            rs.append(f"{os.path.relpath(p, ROOT)}:{code.count(chr(10), 0, m.start()) + 1}")
    fig["result_string"] = len(rs)
    for r in rs:
        broken.append(f"{r}: returns Result<_, String>")

    graph = import_graph()
    layer = sorted(
        f"{'::'.join(m)} -> {'::'.join(t)}"
        for m, ts in graph.items()
        for t in ts
        if m and m[0] not in UPPER and t and t[0] in UPPER
    )
    # The top floors run one way: `cli` (flags to options) may import `commands`, never the
    # reverse; and `cli` renders nothing (a report's rendering lives with the report type).
    upward = sorted(
        f"{'::'.join(m)} -> {'::'.join(t)}"
        for m, ts in graph.items()
        for t in ts
        if m and m[0] == "commands" and t and t[0] == "cli"
    )
    for p in rust_files(os.path.join(LIB, "cli")):
        code = strip_code(open(p, encoding="utf-8").read())
        for m in re.finditer(r"\bimpl\s+(?:crate::report::)?Report\s+for\s+(\w+)", code):
            upward.append(f"{os.path.relpath(p, ROOT)}:{code.count(chr(10), 0, m.start()) + 1} renders {m.group(1)}")
    fig["layer_violations"] = layer + upward
    for v in layer:
        broken.append(f"core imports a command: {v}")
    for v in upward:
        broken.append(f"cli and commands out of order: {v}")

    circ = circles(graph)
    fig["import_circles"] = [" <-> ".join(c) for c in circ]
    for c in circ:
        broken.append(f"import circle: {' <-> '.join(c)}")

    leaves = {}
    for p in rust_files(LIB):
        m = module_of(p)
        if m:
            leaves.setdefault(m[-1], []).append("::".join(m))
    # The same phase name in two commands (`restore::plan`, `drill::plan`) is a pattern, not a
    # collision: allowed where every module of that name sits at the same depth under a different
    # parent. A name repeated at another depth (`spool` beside `prefetch::spool`) blurs.
    def blurs(paths):
        parts = [p.split("::") for p in paths]
        same_depth = len({len(x) for x in parts}) == 1 and len(parts[0]) >= 2
        return not (same_depth and len({tuple(x[:-1]) for x in parts}) == len(parts))

    alike = {k: v for k, v in leaves.items() if len(v) > 1 and blurs(v)}
    fig["alike_modules"] = alike
    for k, v in sorted(alike.items()):
        broken.append(f"modules named alike: {', '.join(v)}")

    if as_json:
        print(json.dumps(fig, indent=2))
    else:
        for b in BINS:
            print(f"{b}: {fig['binary_lines'][b]} lines, {fig['binary_prints'][b]} println!/print!/json!")
        print("longest functions:", *fig["longest_functions"][:5], sep="\n  ")
        print("longest library files (before tests):", *fig["longest_library_files"][:5], sep="\n  ")
        print(f"functions over {LIMITS['function_lines']} lines: {fig['functions_over_limit']}")
        print(f"Result<_, String>: {fig['result_string']}")
        print(f"import circles: {len(circ)}")
        print(f"core modules importing commands/ or cli/: {len(layer)}")
        print(f"commands importing cli/, or cli/ rendering a report: {len(upward)}")
        print(f"modules named alike: {len(alike)}")
    if broken:
        print(f"arch-check: {len(broken)} limits broken:", file=sys.stderr)
        for b in broken:
            print(f"  {b}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
