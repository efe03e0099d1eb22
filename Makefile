# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs mimfm into it first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mimfm-installed
DEMO   ?= demo_out
# torch and torchvision go in first, as a matching pair, before timm can pull in an unpinned
# torchvision (0.29.1 needs torch 2.14.1, the CUDA build: 3.2 GB of NVIDIA libraries on a CPU host).
# - With a GPU (a working nvidia-smi): PyPI's default, CUDA builds.
# - Without one: CPU_TORCH, the CPU builds of a matching pair, from local wheels only (pip's configured
#   find-links, or WHEELS): nothing beyond the package registry is reached. PyPI has no CPU
#   torchvision: its Linux wheels link CUDA torch (libc10_cuda.so),
#   so beside a CPU torch they fail to import ("operator torchvision::nms does not exist"), and so
#   does timm. Where no CPU pair can be had (offline, no wheels), the CUDA pair goes in, with a note.
# TORCH="torch==X torchvision==Y" overrides the choice.
HAS_GPU   := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
CPU_TORCH ?= torch==2.13.0+cpu torchvision==0.28.0+cpu
WHEELS    ?= /opt/wheels
TORCH     ?=

.PHONY: install test demo clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q $(TORCH); \
	elif [ "$(HAS_GPU)" = 1 ]; then $(PY) -m pip install -q torch torchvision; \
	elif $(PY) -m pip install -q --no-index $(if $(wildcard $(WHEELS)),--find-links $(WHEELS)) $(CPU_TORCH) \
	        2>/dev/null; then \
	    echo "no GPU: installed the CPU builds $(CPU_TORCH)"; \
	else echo "no GPU, but no CPU build of $(CPU_TORCH) to be had: installing PyPI's CUDA build" \
	    "(runs on CPU; ~3 GB of NVIDIA libraries)"; $(PY) -m pip install -q torch torchvision; fi
	$(PY) -m pip install -q -e ".[test]"
	@# PyRadiomics, the reference tests/test_radiomics_reference.py checks our radiomics features against.
	@# It has no wheel for current Pythons and its setup.py imports numpy and versioneer, so it builds
	@# from source without build isolation (~7 s), so its build tools go in first: a Python >= 3.12 venv
	@# has no setuptools, and a 3.11 venv's setuptools 65 has no bdist_wheel without `wheel` (measured in a
	@# fresh venv). Pinned: PyPI's 3.1.0 sdist says it is 3.0.1a1 inside, so pip discards it after
	@# downloading it (34 MB) and falls back to 3.0.1 anyway.
	$(PY) -m pip install -q setuptools wheel versioneer
	$(PY) -m pip install -q --no-build-isolation pyradiomics==3.0.1
	@# A mismatched pair fails here, once, rather than in every test that imports timm.
	@$(PY) -c "import torch, torchvision" || { echo "torch and torchvision do not match; set TORCH to a pair"; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

# One pytest worker per core (pytest-xdist; tests/conftest.py keeps each module, and the DeepSpeed modules'
# shared 2-rank runs, in one worker), at most 4: each worker holds its own torch and test cohort.
# On 2 cores: 17 min 31 s against 28 min 42 s in one process (2026-12-07). TEST_WORKERS=0: one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n > 4 ? 4 : n )))

test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

# The whole pipeline on the built-in synthetic cohort: synth -> prepare -> pretrain -> export ->
# fine-tune (classification, survival and three channels, each with the hybrid it fits by default; one held-out
# test set: the same splits.json) -> evaluate -> predict. Minutes on 2 CPU cores.
# One intra-op thread: on 2 cores beside data workers, two OpenMP threads thrash (4-7x slower, measured).
demo: export OMP_NUM_THREADS ?= 1
demo: $(STAMP)
	@# a demo is a fresh run: runs refuse another run's output folders, so the last demo's go first
	rm -rf $(DEMO)
	@# T1-CE (column image), FLAIR and FET-PET (own grid, Bq/mL); the T1-CE volumes are those of a T1-CE-only cohort
	$(PY) -m data.synth --out $(DEMO)/cohort --n_unlabeled 24 --n_labeled 48 --n_external 12 --seed 0 --overwrite \
	    --sequences t1ce,flair,pet
	$(PY) -m data.prepare --manifest $(DEMO)/cohort/unlabeled.csv --cache $(DEMO)/cache
	$(PY) -m data.prepare --manifest $(DEMO)/cohort/manifest.csv --cache $(DEMO)/cache
	@# every sequence of the unlabelled scans, each as its own sample (some subjects lack FLAIR or PET)
	$(PY) -m pretrain --config launch/pretrain_tiny_cpu.yaml --data $(DEMO)/cohort/unlabeled.csv \
	    --images image,flair,pet:pet --cache_dir $(DEMO)/cache --output_dir $(DEMO)/pretrain
	$(PY) -m models.export --checkpoint $$(ls -d $(DEMO)/pretrain/checkpoints/ckpt-* | tail -n 1) \
	    --out $(DEMO)/pretrain/encoder_monai --format monai
	$(PY) -m finetune --config launch/finetune_tiny_cpu.yaml --manifest $(DEMO)/cohort/manifest.csv \
	    --external $(DEMO)/cohort/external.csv --pretrained $(DEMO)/pretrain/encoder --cache_dir $(DEMO)/cache \
	    --splits $(DEMO)/splits.json --task classification --fusion concat --hybrid --output_dir $(DEMO)/finetune_cls
	$(PY) -m finetune --config launch/finetune_tiny_cpu.yaml --manifest $(DEMO)/cohort/manifest.csv \
	    --external $(DEMO)/cohort/external.csv --pretrained $(DEMO)/pretrain/encoder --cache_dir $(DEMO)/cache \
	    --splits $(DEMO)/splits.json --task survival --fusion concat --output_dir $(DEMO)/finetune_surv --explain 0
	@# the light Primus-style decoder: a third of UNETR-style's compute, so the demo stays short
	$(PY) -m finetune --config launch/finetune_tiny_cpu.yaml --manifest $(DEMO)/cohort/manifest.csv \
	    --pretrained $(DEMO)/pretrain/encoder --cache_dir $(DEMO)/cache --splits $(DEMO)/splits.json \
	    --task segmentation --model.seg_head primus --epochs 25 --batch_size 4 --output_dir $(DEMO)/finetune_seg
	@# two external patients as if nobody had outlined them: segmented, then classified from the predicted mask
	head -n 3 $(DEMO)/cohort/external.csv > $(DEMO)/cohort/external_first2.csv
	$(PY) -m finetune.predict --model $(DEMO)/finetune_cls/model --seg_model $(DEMO)/finetune_seg/model/fold0 \
	    --manifest $(DEMO)/cohort/external_first2.csv --segment_all --out $(DEMO)/predict/without_masks.csv \
	    --cache_dir $(DEMO)/cache
	@# T1-CE + FLAIR + FET-PET (SUV from the manifest's dose, weight and time, then TBR) + mask: 4 channels
	$(PY) -m finetune --config launch/finetune_tiny_cpu.yaml --manifest $(DEMO)/cohort/manifest.csv \
	    --external $(DEMO)/cohort/external.csv --pretrained $(DEMO)/pretrain/encoder --cache_dir $(DEMO)/cache \
	    --splits $(DEMO)/splits.json --task classification --fusion concat --images image,flair,pet:pet \
	    --epochs 10 --explain 1 --output_dir $(DEMO)/finetune_3ch
	$(PY) -m finetune.predict --model $(DEMO)/finetune_3ch/model --manifest $(DEMO)/cohort/external.csv \
	    --out $(DEMO)/predict/external_3ch.csv --cache_dir $(DEMO)/cache
	$(PY) -m finetune.evaluate --predictions $(DEMO)/finetune_cls/predictions.csv \
	    --manifest $(DEMO)/cohort/manifest.csv --external $(DEMO)/cohort/external.csv --out $(DEMO)/evaluate_cls
	$(PY) -m finetune.predict --model $(DEMO)/finetune_cls/model --manifest $(DEMO)/cohort/external.csv \
	    --out $(DEMO)/predict/external_predictions.csv --cache_dir $(DEMO)/cache
	@echo ""
	@echo "demo done. Look at:"
	@echo "  pretraining previews   $(DEMO)/pretrain/previews/*.png   (encoder: $(DEMO)/pretrain/encoder)"
	@echo "  classification         $(DEMO)/finetune_cls/metrics.json, roc_*.png, calibration_*.png, explain/"
	@echo "  hybrid (+ baselines)   $(DEMO)/finetune_cls/hybrid/, hybrid_prob in predict/external_predictions.csv"
	@echo "                         (fitted by default: also $(DEMO)/finetune_surv/hybrid/, $(DEMO)/finetune_3ch/hybrid/)"
	@echo "  survival               $(DEMO)/finetune_surv/metrics.json, km_*.png"
	@echo "  segmentation           $(DEMO)/finetune_seg/metrics.json, segmentation.csv, segmentation/*.png"
	@echo "  T1-CE + FLAIR + PET    $(DEMO)/finetune_3ch/metrics.json, explain/, predict/external_3ch.csv"
	@echo "  predictions            $(DEMO)/predict/external_predictions.csv"
	@echo "  without a drawn mask   $(DEMO)/predict/without_masks.csv, without_masks_masks/*.png (predicted masks)"

clean:
	rm -rf $(DEMO)
