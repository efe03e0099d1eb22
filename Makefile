# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs mimfm into it first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mimfm-installed
DEMO   ?= demo_out
# The CPU wheel of torch 2.13.0 lies on disk on our machines; timm's torchvision may move it to 2.14.1.
TORCH  ?= torch==2.13.0

.PHONY: install test demo clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The whole pipeline on the built-in synthetic cohort: synth -> prepare -> pretrain -> export ->
# fine-tune (classification and survival) -> evaluate -> predict. Minutes on 2 CPU cores.
# One intra-op thread: on 2 cores beside data workers, two OpenMP threads thrash (4-7x slower, measured).
demo: export OMP_NUM_THREADS ?= 1
demo: $(STAMP)
	$(PY) -m data.synth --out $(DEMO)/cohort --n-unlabeled 24 --n-labeled 48 --n-external 12 --seed 0 --overwrite
	$(PY) -m data.prepare --folder $(DEMO)/cohort/unlabeled --cache $(DEMO)/cache
	$(PY) -m data.prepare --manifest $(DEMO)/cohort/manifest.csv --cache $(DEMO)/cache
	$(PY) -m pretrain --config launch/pretrain_tiny_cpu.yaml --data $(DEMO)/cohort/unlabeled \
	    --cache_dir $(DEMO)/cache --output_dir $(DEMO)/pretrain
	$(PY) -m models.export --checkpoint $$(ls -d $(DEMO)/pretrain/checkpoints/ckpt-* | tail -n 1) \
	    --out $(DEMO)/pretrain/encoder_monai --format monai
	$(PY) -m finetune --config launch/finetune_tiny_cpu.yaml --manifest $(DEMO)/cohort/manifest.csv \
	    --external $(DEMO)/cohort/external.csv --pretrained $(DEMO)/pretrain/encoder --cache_dir $(DEMO)/cache \
	    --task classification --fusion concat --output_dir $(DEMO)/finetune_cls
	$(PY) -m finetune --config launch/finetune_tiny_cpu.yaml --manifest $(DEMO)/cohort/manifest.csv \
	    --external $(DEMO)/cohort/external.csv --pretrained $(DEMO)/pretrain/encoder --cache_dir $(DEMO)/cache \
	    --task survival --fusion concat --output_dir $(DEMO)/finetune_surv --explain 0
	$(PY) -m finetune.evaluate --predictions $(DEMO)/finetune_cls/predictions.csv \
	    --manifest $(DEMO)/cohort/manifest.csv --external $(DEMO)/cohort/external.csv --out $(DEMO)/evaluate_cls
	$(PY) -m finetune.predict --model $(DEMO)/finetune_cls/model --manifest $(DEMO)/cohort/external.csv \
	    --out $(DEMO)/predict/external_predictions.csv --cache_dir $(DEMO)/cache
	@echo ""
	@echo "demo done. Look at:"
	@echo "  pretraining previews   $(DEMO)/pretrain/previews/*.png   (encoder: $(DEMO)/pretrain/encoder)"
	@echo "  classification         $(DEMO)/finetune_cls/metrics.json, roc_*.png, calibration_*.png, explain/"
	@echo "  survival               $(DEMO)/finetune_surv/metrics.json, km_*.png"
	@echo "  predictions            $(DEMO)/predict/external_predictions.csv"

clean:
	rm -rf $(DEMO)
