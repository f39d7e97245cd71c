"""`make bench`: run every benchmark module, print its markdown table, and gather all into one report.

Each module in BENCHMARKS exposes ``run() -> dict`` with keys ``title``, ``markdown`` (a table) and ``data``
(JSON-able numbers). The report lands in ``bench_out/report.md`` and ``bench_out/report.json``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
from pathlib import Path

BENCHMARKS = [
    "benchmarks.convert_throughput",
    "benchmarks.loader_throughput",
    "benchmarks.train_throughput",
    "benchmarks.memory_prediction",
    "benchmarks.load_memory",
    "benchmarks.long_context_memory",
]


def machine_description() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    import os

    return f"{dev}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", help="module names (e.g. convert_throughput) to run; default all")
    parser.add_argument("--out", default="bench_out", help="folder for report.md / report.json")
    args = parser.parse_args(argv)
    names = [m for m in BENCHMARKS if not args.only or m.rsplit(".", 1)[1] in args.only]
    header = f"Machine: {machine_description()}; date {datetime.date.today().isoformat()}"
    print(header, flush=True)
    sections, data = [f"# dsft benchmarks\n\n{header}\n"], {"machine": header, "results": {}}
    for name in names:
        result = importlib.import_module(name).run()
        print(f"\n## {result['title']}\n\n{result['markdown']}\n", flush=True)
        sections.append(f"## {result['title']}\n\n{result['markdown']}\n")
        data["results"][name] = result["data"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(sections))
    (out / "report.json").write_text(json.dumps(data, indent=2))
    print(f"report: {out / 'report.md'}, {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
