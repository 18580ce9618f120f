# FedOPAL: `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
FEDOPAL := $(VENV)/bin/fedopal
# The torch build to install. The default takes the CPU wheel on disk here, and on a Linux machine with the package
# index PyPI's torch 2.13.0 (a CUDA 12.x build). Another build, e.g. CUDA 12.6 from PyTorch's own index:
#   make venv TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell (cat requirements.txt pyproject.toml; echo '$(TORCH)') | sha1sum | cut -c1-12)
export FEDOPAL_HOME := $(CURDIR)

.PHONY: .venv venv wheel privacy-audit select-poc demo demo-seg demo-3d test test-fast prepare prepare-3d prepare-seg prepare-bench bench bench-dev bench-quick bench-3d bench-seg perf stats \
	gpu-check gpu-wheels wheelhouse docs console-transcript \
	latejoin export poc poc-he clean

.venv venv: $(STAMP)

# Offline (an air-gapped hospital): `make wheelhouse` where there is network, carry the folder over, then
# `make venv WHEELHOUSE=<folder>` installs from it alone (pip --no-index --find-links). README "Air-gapped install".
WHEELHOUSE ?=
PIP_FROM := $(if $(WHEELHOUSE),--no-index --find-links $(abspath $(WHEELHOUSE)),)

# Idempotent: reinstalls only when requirements.txt changes. torch goes first so that the CPU wheel
# on disk satisfies every later `torch` requirement (a bare `torch` would pull a multi-GB CUDA build).
# The fedopal package itself goes in last, editable (custom/fedopal is what runs), with no dependency of its own to
# resolve: the pins above are its dependencies. Then `fedopal` and `python -m fedopal.*` work from any folder.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(PIP_FROM) --upgrade pip
	$(PIP) install --quiet $(PIP_FROM) $(TORCH)
	$(PIP) install --quiet $(PIP_FROM) -r requirements.txt
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PIP) check
	rm -f $(VENV)/.installed-*
	touch $@

data/demo_federation/federation.json: $(STAMP) custom/fedopal/tools/prepare.py data/medmnist/pneumoniamnist.npz
	$(FEDOPAL) prepare --npz data/medmnist/pneumoniamnist.npz --out data/demo_federation --sites 4 --seed 0

prepare: data/demo_federation/federation.json

# 3D: AdrenalMNIST3D as NIfTI volumes, at 28^3 and 64^3 (same samples, same sites)
FED3D_ARGS := --sites 4 --seed 0 --skew-prior global --alpha 2 --train-per-site 100 --val-per-site 30 --test-per-site 64
data/demo_federation_3d/federation.json: $(STAMP) custom/fedopal/tools/prepare.py data/medmnist/adrenalmnist3d.npz
	$(FEDOPAL) prepare --npz data/medmnist/adrenalmnist3d.npz --out data/demo_federation_3d $(FED3D_ARGS)

data/demo_federation_3d_64/federation.json: $(STAMP) custom/fedopal/tools/prepare.py data/medmnist/adrenalmnist3d_64.npz
	$(FEDOPAL) prepare --npz data/medmnist/adrenalmnist3d_64.npz --out data/demo_federation_3d_64 $(FED3D_ARGS)

prepare-3d: data/demo_federation_3d/federation.json data/demo_federation_3d_64/federation.json

# 2D segmentation: HC18 fetal head ultrasound (data/hc18/README.md), 4 sites split by subject, one simulated machine or
# contouring shift per site (fedopal.tools.hc18 SHIFTS)
data/demo_federation_seg/federation.json: $(STAMP) custom/fedopal/tools/hc18.py data/hc18/hc18_small.npz
	$(PY) -m fedopal.tools.hc18 federation --npz data/hc18/hc18_small.npz --out data/demo_federation_seg --sites 4 --seed 0

prepare-seg: data/demo_federation_seg/federation.json

demo: prepare
	$(FEDOPAL) job --config app_configs/demo.yaml --simulate --workspace workspace --results results/demo

# Federated statistics before the first job (docs/data.md): NVFlare's FedStatsRecipe over the demo sites' decoded
# images, with NVFlare's privacy settings; the table, histograms and JSON in docs/results/stats/
stats: prepare
	$(FEDOPAL) stats --config app_configs/demo.yaml --workspace workspace --out docs/results/stats

# What leaves a site under DP (docs/privacy.md "What leaves a site"): the demo federation with DP in update mode and
# with DP-SGD, 2 rounds each; each run's wire audit is in results/privacy/<mode>/wire_fields.json (make docs copies it)
PRIVACY_AUDIT_SET := --set train.num_rounds=2 --set privacy.target_epsilon=8 --set train.class_weights=none
privacy-audit: prepare
	$(FEDOPAL) job --config app_configs/demo.yaml --simulate --workspace workspace $(PRIVACY_AUDIT_SET) \
		--set name=privacy_update --set privacy.mode=update --results results/privacy/update
	$(FEDOPAL) job --config app_configs/demo.yaml --simulate --workspace workspace $(PRIVACY_AUDIT_SET) \
		--set name=privacy_dpsgd --set privacy.mode=dpsgd --results results/privacy/dpsgd

# Segmentation (README "Segmentation"): FedOPAL on 4 HC18 sites (real fetal-head ultrasound, simulated machine and
# contouring shifts), UNETR; then HC18's own measure, the head circumference of each site's test predictions (mm)
demo-seg: prepare-seg
	$(FEDOPAL) job --config app_configs/demo_seg.yaml --simulate --workspace workspace --results results/demo_seg
	$(PY) -m fedopal.tools.hc18 measure --state workspace/fedopal_demo_seg_site_state --out results/demo_seg

demo-3d: prepare-3d
	$(FEDOPAL) job --config app_configs/demo_3d.yaml --simulate --workspace workspace --results results/demo_3d

# A real FLARE deployment on this machine (POC): prepare, start, submit jobs/fedopal_demo with the FLARE API,
# wait, download, per-site table, stop (always, even after a failure). Kept in workspace/poc/, on a free port.
poc: prepare
	$(PY) poc_setup/poc.py run jobs/fedopal_demo

# Encrypted aggregation (federation.encryption he) against plain, on real POC runs: the demo job twice, each in a
# POC provisioned with TenSEAL contexts (NVFlare's HEBuilder), the same seed; writes workspace/poc_he/results/he.md
# (bytes per update, site encrypt/decrypt s, server s, accuracy per round). Cross-site evaluation off in both.
poc-he: prepare
	$(PY) poc_setup/he_compare.py --workspace workspace/poc_he --out workspace/poc_he/results

# Choosing a method on the consortium's own validation data (README "Which method for my consortium?"): a POC of the
# demo federation, three candidates x 2 rounds as real FLARE jobs, the table in docs/results/select/; always stops.
SELECT_POC := workspace/poc_select
select-poc: prepare
	$(PY) poc_setup/poc.py prepare --workspace $(SELECT_POC)/nvflare_poc --home $(SELECT_POC)/home -n 4
	$(PY) poc_setup/poc.py start --workspace $(SELECT_POC)/nvflare_poc; \
	$(FEDOPAL) select --config app_configs/demo.yaml --methods fedopal_w fedavg_lora local --rounds 2 \
		--poc $(SELECT_POC)/nvflare_poc --out $(SELECT_POC)/results; status=$$?; \
	$(PY) poc_setup/poc.py stop --workspace $(SELECT_POC)/nvflare_poc; \
	test $$status -eq 0 && mkdir -p docs/results/select && \
	cp $(SELECT_POC)/results/select.md $(SELECT_POC)/results/select.json docs/results/select/

# The benchmark federations of "Which method for my consortium?" (README): concept shift (RetinaMNIST, a different
# referral threshold per site) and small sites (BreastMNIST 64x64); the third is the demo federation.
data/bench_retina/federation.json: $(STAMP) custom/fedopal/tools/prepare.py data/medmnist/retinamnist.npz
	$(FEDOPAL) prepare --npz data/medmnist/retinamnist.npz --out data/bench_retina --sites 4 --seed 0 \
		--thresholds 1 2 3 2 --no-shifts --alpha 100 --train-per-site 160 --val-per-site 40 --test-per-site 80 \
		--min-test-per-class 30 --min-val-per-class 10
data/bench_breast/federation.json: $(STAMP) custom/fedopal/tools/prepare.py data/medmnist/breastmnist_64.npz
	$(FEDOPAL) prepare --npz data/medmnist/breastmnist_64.npz --out data/bench_breast --sites 4 --seed 0 \
		--alpha 5 --skew-prior global --train-per-site 100 --val-per-site 24 --test-per-site 56 \
		--min-test-per-class 15 --min-val-per-class 5
prepare-bench: prepare data/bench_retina/federation.json data/bench_breast/federation.json

# The benchmark (README "Which method for my consortium?"): every method x 3 seeds on each of the three federations,
# tuned on validation, the same-head table, diagnostics; finished runs in docs/bench/<federation>/runs are reused.
# Then the guide across the three. bench-dev: the earlier 32x32 benchmark on the demo federation (README Results).
BENCH_FEDERATIONS := pneumonia retina breast
bench: prepare-bench
	for fed in $(BENCH_FEDERATIONS); do $(FEDOPAL) bench --config app_configs/bench_$$fed.yaml || exit 1; done
	$(FEDOPAL) bench --guide $(addprefix docs/bench/,$(BENCH_FEDERATIONS)) --out docs/bench/guide.md

bench-dev: prepare
	$(FEDOPAL) bench --config app_configs/bench.yaml

bench-quick: prepare
	$(FEDOPAL) bench --config app_configs/bench.yaml --quick

bench-3d: prepare-3d
	$(FEDOPAL) bench --config app_configs/bench_3d.yaml

# Segmentation (docs/results.md "Segmentation benchmark"): every method x 3 seeds on the HC18 federation at 48x48,
# 3 rounds, one lr (about 40 min of a 2-core CPU); finished runs in docs/bench/seg/runs are reused
bench-seg: prepare-seg
	$(FEDOPAL) bench --config app_configs/bench_seg.yaml

# what FLARE adds on top of the compute (README "Performance")
perf: prepare prepare-seg
	$(FEDOPAL) perf --config app_configs/demo.yaml
	$(FEDOPAL) perf --config app_configs/demo_seg.yaml

# The runtime wheel a hospital installs (docs/deploy.md): dist/fedopal-<version>-py3-none-any.whl, its pins as
# its dependencies. Built from this checkout with the venv's setuptools (no download).
wheel: $(STAMP)
	rm -rf dist build custom/*.egg-info
	$(PIP) wheel --quiet --no-deps --no-build-isolation -w dist .
	rm -rf build custom/*.egg-info
	@ls dist/*.whl

# Every wheel the pinned install needs (torch's build by TORCH, as for venv; pip itself too), into WHEELHOUSE_DIR;
# the list of files is kept in wheelhouse.txt, which a test holds against requirements.txt.
WHEELHOUSE_DIR ?= wheelhouse
wheelhouse: wheel
	python3 -m pip download -q -d $(WHEELHOUSE_DIR) pip $(TORCH) -r requirements.txt
	cp dist/fedopal-*.whl $(WHEELHOUSE_DIR)/
	# a source-only package (pyhocon) becomes a wheel here: offline, pip could not fetch what building it needs
	for sdist in $(WHEELHOUSE_DIR)/*.tar.gz; do [ -e "$$sdist" ] || continue; \
		python3 -m pip wheel -q --no-deps -w $(WHEELHOUSE_DIR) "$$sdist" && rm "$$sdist"; done
	ls $(WHEELHOUSE_DIR) | LC_ALL=C sort > wheelhouse.txt
	@echo "$$(wc -l < wheelhouse.txt) files in $(WHEELHOUSE_DIR) ($$(du -sh $(WHEELHOUSE_DIR) | cut -f1)); list in wheelhouse.txt"

# On a CUDA machine (README "GPU"): the bare loop vs the site loop on ViT-B/16 at 224^2, and a 2-site simulator job;
# writes results/gpu/summary.json. Offline, without the pins: `make gpu-wheels` where there is network, copy .whl/
# over, and this target installs those wheels under /tmp/fedopal-site and uses that machine's own torch.
GPU_SITE := /tmp/fedopal-site
gpu-check:
	@if [ -d .whl ]; then \
		python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl && \
		PYTHONPATH=$(GPU_SITE):$(CURDIR)/custom python3 -u -m fedopal.tools.gpucheck $(GPU_CHECK_ARGS); \
	else \
		$(MAKE) venv && $(PY) -u -m fedopal.tools.gpucheck $(GPU_CHECK_ARGS); \
	fi

# The wheels a CUDA machine with Python 3.12 and torch (but no network) lacks to run gpu-check: the pins below are
# requirements.txt's (pydantic's and cryptography's own needs included); pure-Python ones are built as wheels where
# PyPI has only a source archive (pyhocon).
GPU_WHEEL_PYTHON ?= 3.12
GPU_WHEELS_PURE := nvflare==2.9.0 monai==1.6.1 nibabel==5.4.2 pyhocon==0.3.63 pydantic==2.14.4 \
	annotated-types==0.8.0 typing-inspection==0.4.5 pycparser==3.12 pydicom==3.0.2
GPU_WHEELS_BINARY := pydantic-core==2.50.5 cryptography==50.0.2 cffi==2.1.1
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p))
gpu-wheels:
	python3 -m pip wheel -q --no-deps -w .whl $(GPU_WHEELS_PURE)
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_WHEEL_PYTHON) --implementation cp \
		$(GPU_PLATFORMS) -d .whl $(GPU_WHEELS_BINARY)
	@ls .whl

# A hospital joining later (README "Use your trained models"): 5 sites on disk, the demo job trains on sites 1-4,
# then site-5 compares the global model as is, late join and local-only training (3 seeds; a 40-image site too)
LATEJOIN_WS := workspace/latejoin
LATEJOIN_GLOBAL := $(LATEJOIN_WS)/fedopal_latejoin/server/simulate_job/app_server/FL_global_model.pt
# the late-joiner table in the README was made with a shared head and an unweighted loss: pinned here
LATEJOIN_SET := --set model.head=shared --set train.class_weights=none
LATEJOIN_ARGS := --config app_configs/demo.yaml $(LATEJOIN_SET) --global-model $(LATEJOIN_GLOBAL) --site-dir $(LATEJOIN_WS)/federation/site-5 --seeds 0 1 2
latejoin: $(STAMP)
	$(FEDOPAL) prepare --npz data/medmnist/pneumoniamnist.npz --out $(LATEJOIN_WS)/federation --sites 5 --seed 0
	$(FEDOPAL) job --config app_configs/demo.yaml $(LATEJOIN_SET) --simulate --workspace $(LATEJOIN_WS) --set name=fedopal_latejoin \
		--set data.root=$(LATEJOIN_WS)/federation --set federation.num_sites=4 --results results/latejoin/federation
	$(FEDOPAL) latejoin --compare $(LATEJOIN_ARGS) --out results/latejoin
	$(FEDOPAL) latejoin --compare $(LATEJOIN_ARGS) --train-limit 40 --out results/latejoin/small_site

# The docs that cannot go stale: copy the latest local results (make demo, demo-3d, poc, latejoin, perf,
# console-transcript) into docs/results and docs/perf, then regenerate the README's tables and docs/configuration.md.
# tests/test_docs.py fails when they drift.
docs: $(STAMP)
	mkdir -p docs/results/demo docs/results/demo_3d docs/results/poc docs/results/latejoin docs/results/privacy
	[ ! -f results/demo/summary.md ] || cp results/demo/summary.md results/demo/summary.json results/demo/wire_fields.json docs/results/demo/
	for mode in update dpsgd; do [ ! -f results/privacy/$$mode/wire_fields.json ] || \
		(mkdir -p docs/results/privacy/$$mode && cp results/privacy/$$mode/summary.md results/privacy/$$mode/wire_fields.json docs/results/privacy/$$mode/); done
	[ ! -f results/demo_3d/summary.md ] || cp results/demo_3d/summary.md results/demo_3d/summary.json docs/results/demo_3d/
	[ ! -f results/demo_seg/hc.md ] || (mkdir -p docs/results/demo_seg && cp results/demo_seg/summary.md \
		results/demo_seg/summary.json results/demo_seg/wire_fields.json results/demo_seg/hc.md results/demo_seg/hc.json \
		docs/results/demo_seg/)
	[ ! -f workspace/poc/results/report.md ] || cp workspace/poc/results/report.md docs/results/poc/
	[ ! -f workspace/poc_he/results/he.md ] || (mkdir -p docs/results/he && \
		cp workspace/poc_he/results/he.md workspace/poc_he/results/he.json docs/results/he/)
	[ ! -f results/latejoin/compare.md ] || (mkdir -p docs/results/latejoin/small_site && \
		cp results/latejoin/compare.md docs/results/latejoin/ && \
		cp results/latejoin/small_site/compare.md docs/results/latejoin/small_site/)
	[ ! -f results/console_transcript.txt ] || cp results/console_transcript.txt docs/results/
	[ ! -f results/perf/summary.json ] || cp results/perf/summary.json docs/perf/summary.json
	[ ! -f results/perf/summary_seg.json ] || cp results/perf/summary_seg.json docs/perf/summary_seg.json
	$(FEDOPAL) docs

# the admin console session of README "Deploy to a consortium", from the test that drives it
console-transcript: prepare
	mkdir -p results
	FEDOPAL_CONSOLE_TRANSCRIPT=$(CURDIR)/results/console_transcript.txt $(PY) -m pytest -q tests/test_admin_console.py

# regenerate every committed job folder, both flavors (tests/test_jobs.py fails on drift)
export: $(STAMP)
	$(FEDOPAL) job --config app_configs/demo.yaml --export jobs
	$(FEDOPAL) job --config app_configs/demo_3d.yaml --export jobs
	$(FEDOPAL) job --config app_configs/demo_seg.yaml --export jobs

test: prepare
	$(PY) -m pytest -q tests

test-fast: prepare
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf workspace results .whl dist data/demo_federation data/demo_federation_3d data/demo_federation_3d_64
