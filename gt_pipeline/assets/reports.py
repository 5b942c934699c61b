"""Report assets on the trained GF-MH: gates (G1-G4, G3.5, S0-S4, graduation), ablation, long context.
The comparison of every variant over seeds is `fusion_comparison_report` (gt_pipeline/assets/sweep.py).

Each report is computed on held-out validation text of the checkpoint it names, stored through the
artifact store (markdown + CSV + JSON + PNG), and records its provenance: checkpoint fingerprint,
report code version, torch and wkv6 kernel build. A verdict that changed since the previous report is
flagged. The re-validation schedule re-runs them with `force: true` (recompute, never retrain).
"""

import base64
import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import dagster as dg
import torch
from pydantic import Field

import data
import models
from gt_pipeline import gates
from gt_pipeline.assets.common import OWNER, artifact_output, md_table
from gt_pipeline.assets.training import load_trained
from gt_pipeline.checks import gate_results
from gt_pipeline.engine import evaluate, stats
from gt_pipeline.engine.progress import Progress
from gt_pipeline.engine.train import resolve_device
from gt_pipeline.resources import ProfileResource, StoreResource
from gt_pipeline.store import Artifact, ArtifactStore, BuildResult, fingerprint, write_json_atomic
from gt_pipeline.versions import code_version

GROUP = "reports"
REPORT_VERSION = code_version("reports")  # evaluation, metrics, gates, this module, models
SUBJECT = "trained_gf_mh"
EVAL_SEED = 0  # the evaluation windows, needles and bootstrap resamples: fixed, so reports are comparable
NIAH_FORM = evaluate.Needle("<name>", "<number>", ()).sentence


class ReportConfig(dg.Config):
    device: str = Field(default="auto", description="auto (CUDA if present), cuda or cpu")
    overfit_steps: int | None = Field(default=None, description="gate_report graduation: overfit step budget (profile default)")
    force: bool = Field(default=False, description="Recompute even when a report for this checkpoint exists (re-validation)")


def provenance(ckpt: Artifact, kernel: Artifact) -> dict[str, Any]:
    return {"checkpoint": ckpt.asset, "checkpoint_fingerprint": ckpt.fingerprint, "report_code_version": REPORT_VERSION,
            "torch": torch.__version__, "wkv6_kernel_fingerprint": kernel.fingerprint,
            "computed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def previous_verdicts(store: ArtifactStore, asset: str) -> dict[str, str]:
    """check -> verdict of the last published report of `asset` (read before a forced rebuild moves it)."""
    try:
        prev = json.loads(store.latest(asset).file("report.json").read_text())
    except FileNotFoundError:
        return {}
    return {r["check"]: r["verdict"] for r in prev.get("rows", [])}


def verdict_changes(before: dict[str, str], rows: list[dict[str, Any]]) -> list[str]:
    """Checks whose verdict differs from the previous report."""
    return [f"{r['check']}: {before[r['check']]} -> {r['verdict']}" for r in rows
            if r["check"] in before and before[r["check"]] != r["verdict"]]


def _short(v: Any, width: int = 48) -> Any:
    """Keep a markdown cell narrow (the full value is in report.json / gate_report.csv)."""
    if isinstance(v, float):
        return v
    text = str(v)
    return text if len(text) <= width else text[: width - 1] + "…"


def _png_md(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def _write_rows(d: Path, name: str, rows: list[dict[str, Any]]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(d / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def _fp(asset: str, cfg: ReportConfig, prof, ckpt: Artifact, kernel: Artifact) -> str:
    return fingerprint(asset, REPORT_VERSION, {"device": cfg.device, "overfit_steps": cfg.overfit_steps,
                                               "defaults": prof.reports.__dict__},
                       {SUBJECT: ckpt.fingerprint, "wkv6_kernel": kernel.fingerprint}, {"torch": torch.__version__})


def _build_report(context, name: str, cfg: ReportConfig, prof, st: ArtifactStore, ckpt: Artifact, kernel: Artifact,
                  build) -> BuildResult:
    """Every report: keyed by checkpoint, kernel build, torch and its settings; `force` recomputes."""
    return st.build(name, _fp(name, cfg, prof, ckpt, kernel), build, inputs={SUBJECT: ckpt.fingerprint},
                    force=cfg.force, on_event=context.log.warning)


def _report_output(context, result: BuildResult, headline: dict[str, Any], profile: str) -> dg.Output[Artifact]:
    return artifact_output(context, result, profile=profile, headline=headline,
                           preview_md=result.artifact.file("report.md").read_text())


def _shards_of(store: ArtifactStore, ckpt: Artifact) -> Artifact:
    shards = store.get("token_shards", ckpt.inputs["token_shards"])
    if shards is None:
        raise FileNotFoundError(f"the token_shards {ckpt.inputs['token_shards']} that trained {ckpt.asset} are gone; "
                                "re-materialize token_shards")
    return shards


def _tokenizer_of(store: ArtifactStore, shards: Artifact) -> Artifact:
    """The tokenizer that encoded `shards` (its manifest's inputs), whatever bpe_tokenizer is latest now."""
    tok = store.get("bpe_tokenizer", shards.inputs["bpe_tokenizer"])
    if tok is None:
        raise FileNotFoundError(f"the bpe_tokenizer {shards.inputs['bpe_tokenizer']} that encoded token_shards "
                                f"{shards.fingerprint} is gone; re-materialize bpe_tokenizer")
    return tok


REPORT_KW = dict(group_name=GROUP, kinds={"pandas", "pytorch"}, owners=[OWNER], tags={"stage": "reports"},
                 code_version=REPORT_VERSION)


@dg.asset(**REPORT_KW)
def gate_report(context: dg.AssetExecutionContext, config: ReportConfig, profile: ProfileResource,
                store: StoreResource, trained_gf_mh: Artifact, wkv6_kernel: Artifact) -> dg.Output[Artifact]:
    """G1-G4 and G3.5, the state tests S0-S4 and the graduation tests (overfit a few samples, beat the
    uniform baseline ln(V), checkpoint round-trip) for trained_gf_mh: value / band / verdict."""
    prof, st, dev = profile.get(), store.get(), resolve_device(config.device, "report device")
    ckpt = trained_gf_mh
    before = previous_verdicts(st, "gate_report")

    def build(d: Path) -> dict[str, Any]:
        rows = []
        for r in gate_results(st, ckpt, "gf_mh", device=str(dev), run_id=context.run.run_id, force=config.force,
                              say=context.log.warning)[0]:
            band = {k.removeprefix("band_"): v for k, v in r.detail.items() if k.startswith("band_")}
            rows.append({"check": r.gate, "value": r.value, "band": json.dumps(band) if band else "",
                         "verdict": r.verdict.value})
        model, cfg = load_trained(ckpt, str(dev))
        shards = _shards_of(st, ckpt)
        val = data.TokenShards(shards.path, verify=False).split("validation")
        n = prof.reports.eval_seqs
        xa, _ = evaluate.windows(val, n, 64)
        xb, _ = evaluate.windows(val, n, 64, offset=n * 65)
        state_bands = {"S1": gates.S1_STATE_RMS, "S2": gates.S2_STATE_CHANGE, "S3": gates.S3_DETERMINISM,
                       "S4": gates.S4_STATE_BALANCE}
        for name, res in evaluate.state_tests(model, xa.to(dev), xb.to(dev)).items():
            band = json.dumps(state_bands[name].describe()) if name in state_bands else ""
            rows.append({"check": name, "value": json.dumps(res["value"]), "band": band, "verdict": res["verdict"]})
        factory = lambda: models.get_model(cfg["model"], cfg["vocab_size"], size=cfg["size"], **cfg["model_overrides"]).to(dev)  # noqa: E731
        xo, yo = evaluate.windows(val, 10, 64)
        budget = config.overfit_steps or prof.reports.overfit_steps
        p = Progress("gate_report: overfit 10 sequences", budget, context.log.info, unit="steps")
        ov = evaluate.overfit_test(factory, xo.to(dev), yo.to(dev), budget, gates.OVERFIT_TARGET_LOSS, progress=p)
        p.finish()
        rows.append({"check": "grad_overfit_10", "value": ov["value"],
                     "band": f"loss < {gates.OVERFIT_TARGET_LOSS} within {budget} steps",
                     "verdict": ov["verdict"]})
        val_loss = ckpt.metadata["final_val_loss"]
        uniform = math.log(cfg["vocab_size"])
        rows.append({"check": "grad_beats_uniform", "value": val_loss, "band": f"< ln(V) = {uniform:.3f}",
                     "verdict": "pass" if val_loss < uniform else "fail"})
        rt = evaluate.roundtrip_test(model, factory, d / "roundtrip.safetensors", xa[:2].to(dev), gates.ROUNDTRIP_MAX_ABS)
        (d / "roundtrip.safetensors").unlink()
        rows.append({"check": "grad_checkpoint_roundtrip", "value": rt["value"], "band": f"< {gates.ROUNDTRIP_MAX_ABS}",
                     "verdict": rt["verdict"]})
        changes = verdict_changes(before, rows)
        report = {"provenance": provenance(ckpt, wkv6_kernel), "rows": rows, "verdict_changes": changes}
        write_json_atomic(d / "report.json", report)
        _write_rows(d, "gate_report", rows)
        md = md_table([{"verdict": r["verdict"].upper() if r["verdict"] == "fail" else r["verdict"], "check": r["check"],
                        "value": _short(r["value"]), "band": _short(r["band"])} for r in rows])
        if changes:
            md = "**Verdict changed since the previous report:** " + "; ".join(changes) + "\n\n" + md
        (d / "report.md").write_text(md)
        counts = {v: sum(r["verdict"] == v for r in rows) for v in ("pass", "warn", "fail", "n/a")}
        return {"counts": counts, "verdict_changes": changes, "provenance": report["provenance"]}

    result = _build_report(context, "gate_report", config, prof, st, ckpt, wkv6_kernel, build)
    m = result.artifact.metadata
    return _report_output(context, result, {
        "checks_pass": m["counts"]["pass"], "checks_warn": m["counts"]["warn"], "checks_fail": m["counts"]["fail"],
        "verdict_changed": bool(m["verdict_changes"]), "checkpoint_fingerprint": ckpt.fingerprint,
    }, profile.name)


@dg.asset(**REPORT_KW)
def ablation_report(context: dg.AssetExecutionContext, config: ReportConfig, profile: ProfileResource,
                    store: StoreResource, trained_gf_mh: Artifact, wkv6_kernel: Artifact) -> dg.Output[Artifact]:
    """Validation loss with each branch zero-ablated and mean-ablated (overall and per layer) and each fusion
    path forced, every increase with a 95% CI over validation windows (stats.mean_ci) spread over the whole split;
    contribution shares; gate statistics per layer on held-out (test-split) text; activation variance ratio,
    state norm ratio per layer."""
    prof, st, dev = profile.get(), store.get(), resolve_device(config.device, "report device")
    ckpt, rp = trained_gf_mh, prof.reports

    def build(d: Path) -> dict[str, Any]:
        model, _ = load_trained(ckpt, str(dev))
        shards = data.TokenShards(_shards_of(st, ckpt).path, verify=False)
        val = shards.split("validation")
        x, y = evaluate.spread_windows(val, rp.eval_seqs, rp.eval_len, seed=EVAL_SEED)
        held, _ = evaluate.spread_windows(evaluate.held_out_split(shards), rp.eval_seqs, rp.eval_len, seed=EVAL_SEED)
        p = Progress("ablation_report", 1, context.log.info, unit="evals")
        res = evaluate.ablation_study(model, x, y, held, seed=EVAL_SEED, progress=p)
        p.finish()
        runs = [{"ablation": r.label, "kind": r.kind, "layers": r.layers, "val_loss": r.loss, "delta_loss": r.delta,
                 "delta_lo": r.delta_lo, "delta_hi": r.delta_hi,
                 "significant": not (r.delta_lo <= 0.0 <= r.delta_hi)} for r in res["runs"]]
        _write_rows(d, "ablation", runs)
        _write_rows(d, "balance", res["balance"])
        if res["gates"]:
            _write_rows(d, "gates", res["gates"])
        (d / "ablation.png").write_bytes(_bar_png(runs, res["baseline_loss"]))
        base = res["baseline"]
        summary = {"baseline_loss": base["loss"], "baseline_loss_lo": base["loss_lo"], "baseline_loss_hi": base["loss_hi"],
                   "eval_windows": base["windows"], "eval_tokens": base["windows"] * rp.eval_len,
                   **{f"{b}_share_{k}": res.get(f"{b}_share_{k}", math.nan) for b in ("rwkv", "mamba")
                      for k in ("zero", "mean")}}
        write_json_atomic(d / "report.json", {"provenance": provenance(ckpt, wkv6_kernel), "summary": summary,
                                              "runs": runs, "gates": res["gates"], "balance": res["balance"]})
        md = (f"Baseline val loss **{base['loss']:.4f}** (95% CI [{base['loss_lo']:.4f}, {base['loss_hi']:.4f}], "
              f"{base['windows']} windows x {rp.eval_len} tokens spread over the validation split). "
              f"Each delta is paired by window; *significant* = its 95% CI excludes 0, otherwise the change is "
              f"inside the noise.\n\nContribution shares (loss increase when ablated): zero-ablation RWKV "
              f"{summary['rwkv_share_zero']:.1%} / Mamba {summary['mamba_share_zero']:.1%}; mean-ablation RWKV "
              f"{summary['rwkv_share_mean']:.1%} / Mamba {summary['mamba_share_mean']:.1%}\n\n"
              + _png_md((d / "ablation.png").read_bytes(), "ablation") + "\n\n" + md_table(runs)
              + ("\n\n**Fusion gate per layer** (held-out test-split text)\n\n" + md_table(res["gates"])
                 if res["gates"] else "")
              + "\n\n**Balance per layer**\n\n" + md_table(res["balance"]))
        (d / "report.md").write_text(md)
        return summary

    result = _build_report(context, "ablation_report", config, prof, st, ckpt, wkv6_kernel, build)
    return _report_output(context, result, {k: float(v) for k, v in result.artifact.metadata.items()}, profile.name)


@dg.asset(**REPORT_KW)
def long_context_report(context: dg.AssetExecutionContext, config: ReportConfig, profile: ProfileResource,
                        store: StoreResource, trained_gf_mh: Artifact, bpe_tokenizer: Artifact,
                        wkv6_kernel: Artifact) -> dg.Output[Artifact]:
    """Loss at each position bucket and up to each context length (stateful, flat memory, 95% CIs over
    windows spread over the split), the seeds' degradation ratio, and a needle-in-a-haystack grid with
    synthetic key-value needles (a tie is a miss, per-token scores, a no-needle control row, Wilson CIs)."""
    prof, st, dev = profile.get(), store.get(), resolve_device(config.device, "report device")
    ckpt, rp = trained_gf_mh, prof.reports

    def build(d: Path) -> dict[str, Any]:
        model, _ = load_trained(ckpt, str(dev))
        shards = _shards_of(st, ckpt)
        val = data.TokenShards(shards.path, verify=False).split("validation")
        fits = [n for n in rp.lc_lengths if rp.lc_seqs * (n + 1) <= len(val)]
        if not fits:
            raise ValueError(f"the validation split ({len(val)} tokens) holds no {rp.lc_seqs} windows of "
                             f"{min(rp.lc_lengths)} tokens: use a larger corpus or fewer lc_seqs")
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        p = Progress("long context", 1, context.log.info, unit="tokens")
        curve = evaluate.long_context_curve(model, val, fits, rp.lc_seqs, device=dev, seed=EVAL_SEED, progress=p)
        p.finish()
        # GPU: the allocator's peak during the curve; on CPU there is no per-step figure, so none is reported
        peak = {"peak_memory_mb": torch.cuda.max_memory_allocated(dev) / 2**20} if dev.type == "cuda" else {}
        context.log.info(f"long-context curve up to {fits[-1]} tokens in {time.perf_counter() - t0:.1f}s")
        tok = data.load_tokenizer(_tokenizer_of(st, shards).file("tokenizer.json"))
        eot = tok.token_to_id(data.EOT_TOKEN)
        niah_lengths = [n for n in rp.niah_lengths if rp.niah_trials * (n + 1) <= len(val)]
        p = Progress("niah", 1, context.log.info, unit="trials")
        niah = evaluate.niah_grid(model, tok, val, niah_lengths, list(rp.niah_depths), rp.niah_trials, dev, eot,
                                  seed=EVAL_SEED, progress=p)
        p.finish()
        _write_rows(d, "by_length", curve["by_length"])
        _write_rows(d, "buckets", curve["buckets"])
        _write_rows(d, "niah", niah)
        (d / "niah.png").write_bytes(_heatmap_png(niah))
        with_needle = [r for r in niah if r["depth"] != "no needle"]
        control = [r for r in niah if r["depth"] == "no needle"]
        summary = {"max_context": fits[-1], "degradation_ppl_512_over_64": curve["degradation_ppl_512_over_64"],
                   "niah_accuracy": float(sum(r["accuracy"] for r in with_needle) / max(len(with_needle), 1)),
                   "niah_control_accuracy": float(sum(r["accuracy"] for r in control) / max(len(control), 1)),
                   "niah_chance": niah[0]["chance"] if niah else math.nan, **peak}
        write_json_atomic(d / "report.json", {"provenance": provenance(ckpt, wkv6_kernel), "summary": summary,
                                              "curve": curve, "niah": niah})
        md = (f"Loss vs context (stateful, {rp.lc_seqs} windows spread over the validation split, 95% "
              f"CIs over windows: t below {stats.BOOTSTRAP_MIN_N} windows, else bootstrap), degradation "
              f"ppl(512)/ppl(64) = **{curve['degradation_ppl_512_over_64']:.3f}**"
              "\n\n**Loss at each position bucket** (the loss AT those positions)\n\n" + md_table(curve["buckets"])
              + "\n\n**Mean loss over the first n positions**\n\n" + md_table(curve["by_length"])
              + f"\n\n**Needle in a haystack**: \"{NIAH_FORM}\" with a random number as the answer, scored "
              f"against {int(round(1 / summary['niah_chance'])) - 1 if niah else 0} other numbers of the same token "
              "length by mean log-prob per answer token; a hit needs the answer strictly above every distractor "
              "(a tie is a miss); 'no needle' is the control (expected at chance). 95% Wilson CIs over trials.\n\n"
              + _png_md((d / "niah.png").read_bytes(), "niah") + "\n\n" + md_table(niah))
        (d / "report.md").write_text(md)
        return summary

    result = _build_report(context, "long_context_report", config, prof, st, ckpt, wkv6_kernel, build)
    return _report_output(context, result, {k: float(v) for k, v in result.artifact.metadata.items()}, profile.name)



def _bar_png(runs: list[dict[str, Any]], base: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in runs if r["layers"] == "all"] + [r for r in runs if r["layers"] != "all"]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(rows) + 1), dpi=80)
    err = [[r["delta_loss"] - r["delta_lo"] for r in rows], [r["delta_hi"] - r["delta_loss"] for r in rows]]
    ax.barh([f"{r['ablation']} [{r['layers']}]" for r in rows], [r["delta_loss"] for r in rows], xerr=err, capsize=2)
    ax.invert_yaxis()
    ax.set_xlabel(f"val loss increase over baseline {base:.3f}")
    fig.tight_layout()
    return _savefig(fig)


def _heatmap_png(niah: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    niah = [r for r in niah if r["depth"] != "no needle"]  # the control is in the table
    lengths = sorted({r["haystack_tokens"] for r in niah})
    depths = sorted({r["depth"] for r in niah})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in niah:
        grid[depths.index(r["depth"]), lengths.index(r["haystack_tokens"])] = r["accuracy"]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{x:.0%}" for x in depths])
    ax.set_xlabel("haystack tokens")
    ax.set_ylabel("needle depth")
    fig.colorbar(im, label="accuracy")
    fig.tight_layout()
    return _savefig(fig)


def _savefig(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
