# GroundThink pipeline. Each target creates .venv and installs what it needs on a fresh machine.
#   make demo   the main chain on the embedded demo profile (CPU, minutes; seconds when nothing changed);
#               DEMO_ARGS="-c file.yaml" passes run config (e.g. configs/demo_short.yaml)
#   make test   the test suite (GPU tests skip without CUDA)
#   make dev    the Dagster UI on http://127.0.0.1:3000, on the profile the store was last built with
#               ($(GT_HOME)/PROFILE; GT_PROFILE=... overrides), so after `make demo` it shows demo
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU machines carry torch 2.13.0 (CPU build) on local disk; on a GPU box pip takes the CUDA build.
TORCH ?= torch==2.13.0

export GT_HOME ?= $(CURDIR)/.gt
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
# `dagster asset materialize` ignores pyproject.toml and workspace.yaml: it finds code only through
# -m or this variable (a .env file is read too late for it).
export DAGSTER_MODULE_NAME := gt_pipeline.definitions

DEMO_SELECT ?= *gate_report,*ablation_report,*long_context_report
DEMO_ARGS ?=
DEV_PORT ?= 3000

.PHONY: demo test dev clean-artifacts sweep

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	@# The project's environment: activating the venv exports what `dagster asset materialize` needs
	@# (dg needs nothing: it reads pyproject.toml). dagster 1.13's webserver never comes up when
	@# DAGSTER_MODULE_NAME is set next to the workspace that `dagster dev` and `dg dev` hand it (checked
	@# with dg 1.13.27), so both dev commands run without the variable.
	@grep -q 'groundthink-env-v3' $(VENV)/bin/activate || printf '%s\n' \
	  '# groundthink-env-v3: dagster CLI settings' \
	  'export DAGSTER_MODULE_NAME=gt_pipeline.definitions' \
	  'export DAGSTER_HOME="$(CURDIR)/.dagster_home"' \
	  'dagster() { if [ "$${1:-}" = dev ]; then env -u DAGSTER_MODULE_NAME dagster "$$@"; else command dagster "$$@"; fi; }' \
	  'dg() { if [ "$${1:-}" = dev ]; then env -u DAGSTER_MODULE_NAME dg "$$@"; else command dg "$$@"; fi; }' \
	  >> $(VENV)/bin/activate
	touch $@

$(DAGSTER_HOME)/dagster.yaml:
	mkdir -p $(DAGSTER_HOME)
	printf 'telemetry:\n  enabled: false\n' > $@

demo: $(VENV)/.installed $(DAGSTER_HOME)/dagster.yaml
	@# `dagster asset materialize --select ...` and the run's summary (gt_pipeline/demo.py) in one process
	@GT_PROFILE=demo $(PY) -m gt_pipeline.demo --select '$(DEMO_SELECT)' $(DEMO_ARGS) && \
	echo "artifacts under $(GT_HOME) (LATEST.json in each asset's folder)"

test: $(VENV)/.installed
	$(PY) -m pytest -q

dev: $(VENV)/.installed $(DAGSTER_HOME)/dagster.yaml
	env -u DAGSTER_MODULE_NAME $(VENV)/bin/dagster dev -h 127.0.0.1 -p $(DEV_PORT)

clean-artifacts:
	rm -rf $(GT_HOME)

# The research sweep (README "Research sweep"): data + kernel once, then every SWEEP_VARIANTS x SWEEP_SEEDS
# partition of sweep_run as its own `dagster asset materialize` process, SWEEP_K at once, then
# fusion_comparison_report. Each process gets a throw-away Dagster instance (SQLite is not made for K
# concurrent writers); the artifacts and the report live in the store ($$GT_HOME).
SWEEP_VARIANTS ?= gf_mh gf gf_rh hy ws rf cp gf_xm gf_xr hgf hgf_mh hgf_rh gru mingru linrec gpt rwkv6 mamba2
SWEEP_SEEDS ?= 0 1
SWEEP_K ?= 4
SWEEP_CONFIG ?= configs/sweep_h200.yaml
SWEEP_PROFILE ?= full
SWEEP_SOURCE ?= demo
# SWEEP_MPS=1: run the K trainings under a private NVIDIA MPS control daemon (started here, stopped when the
# sweep ends), so the GPU runs their kernels side by side instead of time-slicing the K processes
# (BENCHMARKS.md, issue 16: 1.34x aggregate at K = 4 on the H200). Off by default: MPS changes how the
# GPU is shared for every process of this user while it runs.
SWEEP_MPS ?= 0
sweep: $(VENV)/.installed
	@set -euo pipefail; export GT_PROFILE=$(SWEEP_PROFILE) GT_DATA_SOURCE=$(SWEEP_SOURCE); unset DAGSTER_HOME; \
	D=$(abspath $(VENV))/bin/dagster; \
	case "$(SWEEP_MPS)" in 0) ;; 1) \
	  command -v nvidia-cuda-mps-control > /dev/null || { echo "SWEEP_MPS=1: nvidia-cuda-mps-control is not on PATH (it ships with the NVIDIA driver); run without SWEEP_MPS=1 to time-slice the GPU instead" >&2; exit 2; }; \
	  export CUDA_MPS_PIPE_DIRECTORY=$$(mktemp -d /tmp/gt_mps_pipe.XXXXXX) CUDA_MPS_LOG_DIRECTORY=$$(mktemp -d /tmp/gt_mps_log.XXXXXX); \
	  nvidia-cuda-mps-control -d || { echo "SWEEP_MPS=1: the MPS control daemon did not start (its log: $$CUDA_MPS_LOG_DIRECTORY)" >&2; exit 2; }; \
	  trap 'echo quit | nvidia-cuda-mps-control' EXIT; echo "sweep: MPS control daemon up (pipe $$CUDA_MPS_PIPE_DIRECTORY)";; \
	*) echo "SWEEP_MPS must be 0 or 1, got '$(SWEEP_MPS)'" >&2; exit 2;; esac; \
	$$D asset materialize --select '+token_shards,wkv6_kernel'; \
	mkdir -p "$(GT_HOME)/sweep_logs"; start=$$(date +%s); \
	for s in $(SWEEP_SEEDS); do for v in $(SWEEP_VARIANTS); do echo "$$s|$$v"; done; done | \
	  xargs -P $(SWEEP_K) -I{} sh -c '"$$0" asset materialize --select sweep_run --partition "{}" -c $(SWEEP_CONFIG) \
	    > "$(GT_HOME)/sweep_logs/$$(echo "{}" | tr "|" _).log" 2>&1 && echo "done {}" || { echo "FAILED {} (log in $(GT_HOME)/sweep_logs)"; exit 1; }' $$D \
	  || echo "some partitions failed; the report compares the runs that finished"; \
	echo "sweep: $$(( $$(date +%s) - start ))s wall for $(words $(SWEEP_VARIANTS)) variants x $(words $(SWEEP_SEEDS)) seeds, K=$(SWEEP_K)"; \
	$$D asset materialize --select fusion_comparison_report; \
	echo "report: $(GT_HOME)/fusion_comparison_report/$$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["fingerprint"])' $(GT_HOME)/fusion_comparison_report/LATEST.json)/report.md"

# On a CUDA machine: the GPU-marked tests and the three benchmarks, logs and JSON into $(GPU_OUT).
# GPU_PY defaults to the venv's python; on a machine set up by hand pass GPU_PY=python3.
GPU_OUT ?= bench_out
GPU_PY ?= $(PY)
.PHONY: gpu-bench
gpu-bench:
	mkdir -p $(GPU_OUT)
	set -o pipefail; $(GPU_PY) -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee $(GPU_OUT)/gpu_tests.log
	$(GPU_PY) -m kernels.bench > $(GPU_OUT)/kernels_bench.json
	$(GPU_PY) -m gt_pipeline.engine.bench --models GF-MH,GPT --size 5m --vocab 16000 --batch 64 --seq 512 > $(GPU_OUT)/train_bench.json

# On a CUDA machine: the pipeline's own default path with no run config (GF-MH 5m, 64 x 512, 5000 steps, the demo
# corpus so nothing is downloaded), engine.bench at the same shape on the same shards in the same call (steady state
# vs bench, and the loss curve of the default path against the reference path), the second materialization (a cache
# hit), then the reports on that checkpoint. Logs and JSON into $(GPU_OUT).
.PHONY: gpu-pipeline
gpu-pipeline:
	mkdir -p $(GPU_OUT)
	set -o pipefail; GT_PROFILE=full GT_DATA_SOURCE=demo $(GPU_PY) -m dagster asset materialize --select '*trained_gf_mh' 2>&1 | tee $(GPU_OUT)/materialize1.log | grep -E "paths:|slower path|steady-state|built in|cache hit"
	$(GPU_PY) -m gt_pipeline.engine.bench --models GF-MH --size 5m --vocab 16000 --batch 64 --seq 512 --warmup 5 --steps 195 \
	  --compare --shards $$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["path"])' $(GT_HOME)/token_shards/LATEST.json) > $(GPU_OUT)/bench_compare.json
	set -o pipefail; GT_PROFILE=full GT_DATA_SOURCE=demo $(GPU_PY) -m dagster asset materialize --select '*trained_gf_mh' 2>&1 | tee $(GPU_OUT)/materialize2.log | grep -E "cache hit|built in"
	set -o pipefail; GT_PROFILE=full GT_DATA_SOURCE=demo $(GPU_PY) -m dagster asset materialize --select 'gate_report,ablation_report,long_context_report' 2>&1 | tee $(GPU_OUT)/reports.log | grep -E "cache hit|built in"
