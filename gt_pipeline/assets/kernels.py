"""Kernel asset: the wkv6 extension compiled for this machine, smoke-tested against the reference.

The compiled library lives in the kernels build cache (keyed by source hash, torch, CUDA and arch);
the artifact records how it was built and how it compared with `kernels.wkv6_ref`. The fingerprint
needs only the toolchain description (no compiler runs), so a cache hit neither compiles nor loads
the extension; training loads it when it needs it. A failed compile fails the materialization with
the compiler's message: there is no silent fallback.
"""

import dagster as dg
from pydantic import Field

import kernels
from gt_pipeline.assets.common import OWNER, artifact_output, md_table
from gt_pipeline.resources import ProfileResource, StoreResource
from gt_pipeline.store import Artifact, fingerprint, write_json_atomic
from gt_pipeline.versions import code_version

GROUP = "kernels"
KERNEL_VERSION = code_version("wkv6_kernel")


class Wkv6KernelConfig(dg.Config):
    device: str = Field(default="auto", description="`auto` (CUDA if available, else CPU), `cuda` or `cpu`")
    force: bool = Field(default=False, description="Re-run the smoke test even when a verified record exists")


@dg.asset(
    group_name=GROUP,
    # Kinds are fixed when the definitions load, the backend is not (CUDA on a GPU machine, C++ on a CPU
    # one): the kind stays neutral and the built backend is in the materialization's `backend` metadata.
    kinds={"pytorch"},
    owners=[OWNER],
    tags={"stage": "kernels"},
    code_version=KERNEL_VERSION,
)
def wkv6_kernel(context: dg.AssetExecutionContext, config: Wkv6KernelConfig, profile: ProfileResource,
                store: StoreResource) -> dg.Output[Artifact]:
    """The compiled wkv6 (RWKV-6 recurrence) extension for this machine: CUDA when a GPU is present,
    else the C++ CPU backend; built with ninja into a cache keyed by sources, torch, CUDA and arch."""
    if config.device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"wkv6_kernel.device={config.device!r}: choose auto, cuda or cpu")
    toolchain = kernels.toolchain_fingerprint(config.device)
    fp = fingerprint("wkv6_kernel", KERNEL_VERSION, {"device": config.device}, env=toolchain)

    def build(d):
        context.log.info(f"building/loading wkv6 for {config.device} ({toolchain})")
        info = kernels.build_extension(config.device)
        context.log.info(f"wkv6 {info['backend']} extension ready in {info['build_seconds']:.1f}s "
                         f"(build cache hit: {info['cache_hit']})")
        smoke = kernels.smoke_test(info["backend"])
        write_json_atomic(d / "build_info.json", info)
        write_json_atomic(d / "smoke_test.json", smoke)
        if not smoke["passed"]:
            raise RuntimeError(f"wkv6 {info['backend']} extension disagrees with wkv6_ref: {smoke}")
        return {"build": info, "smoke": smoke}

    result = store.get().build("wkv6_kernel", fp, build, inputs={"toolchain": toolchain},
                               force=config.force, on_event=context.log.warning)
    meta = result.artifact.metadata
    binfo, smoke = meta["build"], meta["smoke"]
    cases = smoke.get("cases", {"": smoke})
    rows = [{"case": c, "tensor": n, "max_abs_err": r["max_abs_err"][n], "max_rel_err": r["max_rel_err"][n],
             "tolerance (rel)": r["tolerance"][n], "passed": r["max_rel_err"][n] <= r["tolerance"][n]}
            for c, r in cases.items() for n in r["max_abs_err"]]
    preview = (f"**{binfo['backend']}** extension, {binfo['compiler']}, arch `{binfo['arch']}`, torch "
               f"{binfo['torch_version']}\n\nSmoke test vs `wkv6_ref` ({smoke['shape']}), every implementation "
               f"training can pick ({', '.join(cases)}):\n\n" + md_table(rows))
    return artifact_output(
        context, result, profile=profile.name,
        headline={
            "backend": binfo["backend"],
            "arch": str(binfo.get("arch")),
            "compiler": str(binfo.get("compiler")),
            "compile_seconds": float(binfo["build_seconds"]),
            "build_cache_hit": bool(binfo["cache_hit"]),
            "extension_loaded_this_run": not result.cache_hit,
            "smoke_max_rel_err": max(smoke["max_rel_err"].values()),
            "smoke_passed": bool(smoke["passed"]),
            "smoke_cases": ", ".join(cases),
        },
        preview_md=preview,
    )
