"""Every `docs/<page>.md#<anchor>` cited in the repository names a heading that exists, so a
citation in the code always leads somewhere."""
from __future__ import annotations

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITATION = re.compile(r"docs/([\w.-]+\.md)((?:#[\w-]+)?)((?:, #[\w-]+)*)")


def anchors(page: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    with open(os.path.join(ROOT, "docs", page), encoding="utf-8") as f:
        headings = [line.lstrip("#").strip() for line in f if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def repository_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = out.split()
    except (OSError, subprocess.CalledProcessError):
        files = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(ROOT) for f in fs]
    return [f for f in files if f.endswith((".py", ".cc", ".h", ".md", ".tsv"))]


def test_doc_anchors_exist():
    missing = []
    for path in repository_files():
        with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
            text = f.read()
        for page, first, more in CITATION.findall(text):
            if not os.path.isfile(os.path.join(ROOT, "docs", page)):
                missing.append(f"{path}: docs/{page}")
                continue
            known = anchors(page)
            for anchor in [first] + more.split(", "):
                if anchor.lstrip("#") and anchor.lstrip("#") not in known:
                    missing.append(f"{path}: docs/{page}{anchor}")
    assert not missing, "\n".join(missing)


def test_anchor_rule():
    assert anchors("minicpm4.md") >= {"infllm-v2-pooling", "infllm-v2-conventions", "mup-scales", "longrope"}
