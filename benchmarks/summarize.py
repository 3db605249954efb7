"""Turn a pytest-benchmark JSON file into a markdown table (CUDA-event medians, ratios to ours).

    python benchmarks/summarize.py results.json
"""

import json
import sys


def main(path):
    benches = json.load(open(path))["benchmarks"]
    rows = []
    for b in benches:
        info = b["extra_info"]
        ms = info.get("cuda_event_median_ms", info.get("cpu_median_ms"))
        rows.append((b["name"], info, ms))
    # Ours per comparable group (same test function and every parameter except impl).
    def group(name, info):
        return (name.split("[")[0], info.get("batch"), info.get("shape"), info.get("pass_"))

    ours = {group(n, i): ms for n, i, ms in rows if i.get("impl") == "vpit_fast"}
    print("| benchmark | device | ms (median) | vs vpit_fast | extra |")
    print("|---|---|---|---|---|")
    for name, info, ms in rows:
        base = ours.get(group(name, info))
        ratio = f"{ms / base:.2f}x" if base and ms else "-"
        extra = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in info.items()
                 if k not in ("device", "torch", "cuda", "sms", "cuda_event_median_ms", "cpu_median_ms")}
        print(f"| {name} | {info.get('device')} | {ms:.4f} | {ratio} | {extra} |")


if __name__ == "__main__":
    main(sys.argv[1])
