"""Kernel asset: the wkv6 extension compiled for this machine, smoke-tested against the reference.

The compiled library lives in the kernels build cache (keyed by source hash, torch, CUDA and arch);
the artifact records how it was built and how it compared with `kernels.wkv6_ref`. A failed compile
fails the materialization with the compiler's message: there is no silent fallback.
"""

import dagster as dg
from pydantic import Field

import kernels
from gt_pipeline.assets.common import OWNER, artifact_output, md_table
from gt_pipeline.resources import StoreResource
from gt_pipeline.store import Artifact, fingerprint, write_json_atomic

GROUP = "kernels"
KERNEL_VERSION = "wkv6-v1"


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
def wkv6_kernel(context: dg.AssetExecutionContext, config: Wkv6KernelConfig, store: StoreResource) -> dg.Output[Artifact]:
    """The compiled wkv6 (RWKV-6 recurrence) extension for this machine: CUDA when a GPU is present,
    else the C++ CPU backend; built with ninja into a cache keyed by sources, torch, CUDA and arch."""
    if config.device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"wkv6_kernel.device={config.device!r}: choose auto, cuda or cpu")
    toolchain = kernels.toolchain_fingerprint(config.device)
    fp = fingerprint("wkv6_kernel", KERNEL_VERSION, {"device": config.device}, env=toolchain)

    # Always (re)load the extension: a no-op when its build dir is current, a rebuild if it was wiped.
    context.log.info(f"building/loading wkv6 for {config.device} ({toolchain})")
    info = kernels.build_extension(config.device)
    context.log.info(f"wkv6 {info['backend']} extension ready in {info['build_seconds']:.1f}s (build cache hit: {info['cache_hit']})")

    def build(d):
        smoke = kernels.smoke_test(info["backend"])
        write_json_atomic(d / "build_info.json", info)
        write_json_atomic(d / "smoke_test.json", smoke)
        if not smoke["passed"]:
            raise RuntimeError(f"wkv6 {info['backend']} extension disagrees with wkv6_ref: {smoke}")
        return {"build": info, "smoke": smoke}

    result = store.get().build("wkv6_kernel", fp, build, inputs={"toolchain": toolchain},
                               force=config.force, on_event=context.log.warning)
    meta = result.artifact.metadata
    build, smoke = meta["build"], meta["smoke"]
    rows = [{"tensor": n, "max_abs_err": smoke["max_abs_err"][n], "max_rel_err": smoke["max_rel_err"][n],
             "tolerance (rel)": smoke["tolerance"][n]} for n in smoke["max_abs_err"]]
    preview = (f"**{build['backend']}** extension, {build['compiler']}, arch `{build['arch']}`, torch "
               f"{build['torch_version']}\n\nSmoke test vs `wkv6_ref` ({smoke['dtype']}, {smoke['shape']}):\n\n" + md_table(rows))
    return artifact_output(
        context, result,
        headline={
            "backend": build["backend"],
            "arch": str(build.get("arch")),
            "compiler": str(build.get("compiler")),
            "compile_seconds": float(info["build_seconds"]),
            "build_cache_hit": bool(info["cache_hit"]),
            "smoke_max_rel_err": max(smoke["max_rel_err"].values()),
            "smoke_passed": bool(smoke["passed"]),
        },
        preview_md=preview,
    )
