"""``python -m dhumor.inference.report RESULTS.jsonl``: one line per scored meme (decision, probability,
caption or error). ``ABSTAIN`` marks a meme the model would not decide on (unfamiliar, or too close to the
threshold): it goes to a moderator, it is not cleared."""
from __future__ import annotations

import json
import sys


def summary_lines(path: str) -> list[str]:
    lines = []
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh.read().split("\n"):  # "\n" only ends a row
            if not line.strip():
                continue
            r = json.loads(line)
            dec = r.get("decision")
            if r.get("error"):
                flag = "ERROR  "
            elif dec and dec.get("abstain"):
                flag = "ABSTAIN"
            else:
                flag = "FLAG   " if dec and dec["flagged"] else "ok     "
            p = f"p({dec['task']})={dec['probability']:.2f}" if dec else " " * 16
            text = (r.get("error") or r.get("caption") or "").replace("\n", " / ")[:60]
            lines.append(f"{r['id'][:24]:24s} {flag} {p}  {text}")
    return lines


if __name__ == "__main__":
    print("\n".join(summary_lines(sys.argv[1])))
