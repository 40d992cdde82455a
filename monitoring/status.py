"""``hilum status RUN``: the run's figures per rank in the terminal, without Grafana.

The source is what Prometheus would scrape: each rank's endpoint listed in
``RUN_DIR/metrics_targets/rankN.json``; a rank whose endpoint is gone (the run ended, or the
rank died) is shown from its last snapshot ``RUN_DIR/metrics/rankN.prom`` when there is one.
Endpoints bind to 127.0.0.1 by default, so from another machine only snapshots are visible.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

PHASES = ("data", "forward", "loss", "replay", "backward", "optimizer", "after_step")  # replay: GradCache's second forward


@dataclass
class RankView:
    rank: int
    live: bool
    node: str = ""
    values: dict[str, float] = field(default_factory=dict)  # metric name (+ label) -> value


def parse_metrics(text: str, run: str | None = None) -> tuple[str, dict[str, float]]:
    """(node, {name or name[label]: value}) from Prometheus text; samples of other runs are ignored."""
    node, values = "", {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if run is not None and labels.get("run") not in (None, run):
                continue
            node = labels.get("node", node)
            extra = next((labels[k] for k in ("phase", "term", "kind", "reason", "name") if k in labels), None)
            values[sample.name + (f"[{extra}]" if extra else "")] = float(sample.value)
    return node, values


def collect(run_dir: Path, timeout_s: float = 1.0) -> list[RankView]:
    views = []
    targets = sorted((run_dir / "metrics_targets").glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    for path in targets:
        rank = int(path.stem[4:])
        target = json.loads(path.read_text())[0]
        run = target.get("labels", {}).get("run")
        text, live = None, False
        try:
            with urllib.request.urlopen(f"http://{target['targets'][0]}/metrics", timeout=timeout_s) as resp:
                text, live = resp.read().decode(), True
        except OSError:
            snapshot = run_dir / "metrics" / f"rank{rank}.prom"
            text = snapshot.read_text() if snapshot.is_file() else None
        view = RankView(rank, live)
        if text is not None:
            view.node, view.values = parse_metrics(text, run)
            if live and "hilum_step" not in view.values:  # a port now held by something else
                view.live = False
        views.append(view)
    return views


def render(run_dir: Path, views: list[RankView]) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from hilum.trainer.checkpoint import list_complete

    state = "running" if any(v.live for v in views) else ("finished or stopped" if views else "no metrics yet")
    job_rate = sum(v.values.get("hilum_samples_per_second", 0.0) for v in views)
    lead = views[0].values if views else {}
    ckpts = list_complete(run_dir)
    last = (f"step {ckpts[-1].step} at {time.strftime('%H:%M:%S', time.localtime(ckpts[-1].saved_at))}"
            if ckpts else "none")
    head = Text.assemble(
        (f"{run_dir.name}", "bold"), f"  {state}  step {int(lead.get('hilum_step', 0))}  ",
        f"{job_rate:,.0f} samples/s  loss {lead.get('hilum_loss[loss]', float('nan')):.4f}  ",
        f"1/temperature {lead.get('hilum_logit_scale', float('nan')):.1f}  last checkpoint: {last}",
    )
    table = Table(show_edge=False, header_style="bold")
    for col in ("rank", "node", "step", "samples/s", "step s", *PHASES, "MFU", "memory", "vs median", "bad"):
        table.add_column(col, justify="right")
    for v in views:
        x = v.values
        step_s = x.get("hilum_step_seconds", 0.0)
        phases = [f"{100 * x[f'hilum_phase_seconds[{p}]'] / step_s:.0f}%" if step_s and f"hilum_phase_seconds[{p}]" in x else "-"
                  for p in PHASES]
        memory = next((x[k] for k in ("hilum_device_memory_bytes[allocated]", "hilum_device_memory_bytes[rss]") if k in x), None)
        mfu = x.get("hilum_mfu")
        ratio = x.get("hilum_step_time_vs_median")
        flagged = x.get("hilum_straggler", 0.0) > 0
        bad = sum(value for key, value in x.items() if key.startswith("hilum_bad_samples_total"))
        table.add_row(
            str(v.rank) + ("" if v.live else " (ended)"), v.node, f"{int(x.get('hilum_step', 0))}",
            f"{x.get('hilum_samples_per_second', 0.0):,.1f}", f"{step_s:.3f}", *phases,
            f"{100 * mfu:.1f}%" if mfu is not None else "-",
            f"{memory / 2**30:.2f} GiB" if memory is not None else "-",
            Text(f"{ratio:.2f}" + (" slow" if flagged else ""), style="red" if flagged else "") if ratio is not None else "-",
            f"{int(bad)}",
        )
    return Group(head, table)


def show(run_dir: Path, watch: bool = False, interval_s: float = 2.0) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if not watch:
        console.print(render(run_dir, collect(run_dir)))
        return
    with Live(render(run_dir, collect(run_dir)), console=console, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval_s)
                views = collect(run_dir)
                live.update(render(run_dir, views))
                if views and not any(v.live for v in views):
                    break  # the run is over: the last frame stays on screen
        except KeyboardInterrupt:
            pass
