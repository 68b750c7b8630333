"""Writes and executes notebooks/evaluate_shipped_checkpoint.ipynb (outputs saved in the file).

    python notebooks/make_notebook.py
"""
from pathlib import Path

import nbformat as nbf
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
cells = [
    nbf.v4.new_markdown_cell(
        "# The shipped checkpoint on Harm-C val\n\n"
        "Loads `checkpoints/harmeme-tcrnet` through the public API, evaluates it on HarMeme Harm-C **val** "
        "(never used to train or select it), and plots per-task confusion matrices and per-class errors. "
        "Reads Harm-C from the data root: `$DHUMOR_DATA`, else `data/harmeme-c` (get it with "
        "`dhumor data harmeme SRC data/harmeme-c`, see `data/README.md`)."),
    nbf.v4.new_code_cell(
        "import json\n"
        "from pathlib import Path\n"
        "import numpy as np\n"
        "%matplotlib inline\n"
        "import matplotlib.pyplot as plt\n"
        "from dhumor.inference.pipeline import Pipeline\n"
        "from dhumor.paths import data_root\n"
        "from dhumor.inference.evaluation import evaluate, format_metrics\n"
        "pipe = Pipeline.from_checkpoint()  # the shipped checkpoint\n"
        "VAL = data_root() / 'val.jsonl'\n"
        "metrics, summary = evaluate(pipe, VAL, predictions='val_rows.jsonl')\n"
        "rows = [json.loads(l) for l in open('val_rows.jsonl')]\n"
        "Path('val_rows.jsonl').unlink()  # per-meme rows stay out of the saved notebook\n"
        "print(format_metrics(metrics))"),
    nbf.v4.new_markdown_cell("## Confusion matrices (rows: truth, columns: prediction; gated tasks on labelled rows only)"),
    nbf.v4.new_code_cell(
        "fig, axes = plt.subplots(1, len(pipe.schema.tasks), figsize=(5 * len(pipe.schema.tasks), 4.2))\n"
        "for ax, task in zip(axes, pipe.schema.tasks):\n"
        "    cm = np.array(metrics[task.name]['confusion_matrix'])\n"
        "    ax.imshow(cm, cmap='Blues')\n"
        "    ax.set_xticks(range(task.num_classes), task.classes, rotation=35, ha='right')\n"
        "    ax.set_yticks(range(task.num_classes), task.classes)\n"
        "    for i in range(task.num_classes):\n"
        "        for j in range(task.num_classes):\n"
        "            ax.text(j, i, cm[i, j], ha='center', va='center', color='black')\n"
        "    ax.set_title(f\"{task.name} (n={metrics[task.name]['n']}, macro-F1 {metrics[task.name]['macro_f1']:.2f})\")\n"
        "fig.tight_layout()\n"
        "plt.show()"),
    nbf.v4.new_markdown_cell("## Per-class errors: how many memes of each true class the model got wrong"),
    nbf.v4.new_code_cell(
        "fig, axes = plt.subplots(1, len(pipe.schema.tasks), figsize=(5 * len(pipe.schema.tasks), 3.6))\n"
        "for ax, task in zip(axes, pipe.schema.tasks):\n"
        "    cm = np.array(metrics[task.name]['confusion_matrix'])\n"
        "    support, correct = cm.sum(1), np.diag(cm)\n"
        "    ax.bar(task.classes, support, color='lightgrey', label='support')\n"
        "    ax.bar(task.classes, support - correct, color='tab:red', label='errors')\n"
        "    ax.tick_params(axis='x', rotation=35)\n"
        "    ax.set_title(task.name)\n"
        "    ax.legend()\n"
        "fig.tight_layout()\n"
        "plt.show()\n"
        "for task in pipe.schema.tasks:\n"
        "    cm = np.array(metrics[task.name]['confusion_matrix'])\n"
        "    for c, name in enumerate(task.classes):\n"
        "        n = cm[c].sum()\n"
        "        print(f\"{task.name:12s} {name:18s} support {n:4d}  errors {n - cm[c, c]:4d}  recall {cm[c, c] / max(n, 1):.2f}\")"),
    nbf.v4.new_markdown_cell("## How separable are the classes? P(harmful) by true class\n\n"
                             "Aggregates only: the saved notebook must not carry the dataset's per-meme labels or text."),
    nbf.v4.new_code_cell(
        "from dhumor.data.readers import read_manifest\n"
        "truth = {m.id: m.labels['harmful'] for m in read_manifest(VAL).memes}\n"
        "p = np.array([r['tasks']['harmful']['probs']['yes'] for r in rows if not r['error']])\n"
        "y = np.array([truth[r['id']] for r in rows if not r['error']])\n"
        "fig, ax = plt.subplots(figsize=(6, 3.4))\n"
        "bins = np.linspace(0, 1, 21)\n"
        "ax.hist(p[y == 0], bins, alpha=0.6, label=f'not harmful (n={int((y == 0).sum())})')\n"
        "ax.hist(p[y == 1], bins, alpha=0.6, label=f'harmful (n={int((y == 1).sum())})')\n"
        "th = pipe.presets  # the checkpoint's threshold presets, as every command uses them\n"
        "for name, t in th.items():\n"
        "    ax.axvline(t, ls='--', color='k', lw=0.8)\n"
        "    ax.text(t, ax.get_ylim()[1] * 0.9, name, rotation=90, fontsize=7, ha='right')\n"
        "ax.set_xlabel('P(harmful)')\n"
        "ax.legend()\n"
        "plt.show()\n"
        "for name, t in th.items():\n"
        "    flag = p >= t\n"
        "    print(f\"{name:15s} threshold {t:.2f}: recall {flag[y == 1].mean():.2f}, precision {y[flag].mean():.2f}, \"\n"
        "          f\"flagged {flag.mean():.0%} of memes\")"),
    nbf.v4.new_markdown_cell(
        "Known limits: COVID-era memes only; targets skewed to individuals (50 of 61 harmful val memes); "
        "10 very harmful memes in val make the 3-class numbers noisy; this is HarMeme's label space, not D-HUMOR's."),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                               "language": "python"}})


def build(path: Path = HERE / "evaluate_shipped_checkpoint.ipynb", timeout: int = 900) -> Path:
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}})
    client.execute()
    nbf.write(nb, path)
    return path


if __name__ == "__main__":
    print(build())
