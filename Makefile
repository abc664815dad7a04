# The two set-up commands of the README: `make demo` and `make test`.
# Each one creates (or refreshes) the virtual environment .venv when it is missing
# or older than pyproject.toml / requirements.lock, so a fresh clone needs nothing else.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed

# DVC and friends stay offline and quiet (DESIGN.md, "Environment facts").
export DVC_NO_ANALYTICS := 1
export PATH := $(BIN):$(PATH)

.PHONY: venv demo test test-fast lint bench lock clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $@

TRITON_PORTS ?= --http-port 8000 --grpc-port 8001 --metrics-port 8002

## demo: fetch the demo data, run the pipeline, serve the model on a local Triton, check it,
##       then score the held-out BCCD test slides through it
demo: venv
	dvc pull data.dvc
	dvc repro
	dvc metrics show
	rm -rf outputs/demo_inbox && mkdir -p outputs/demo_inbox
	for slide in $$(cat data/bccd/ImageSets/Main/test.txt); do cp data/bccd/JPEGImages/$$slide.jpg outputs/demo_inbox/; done
	cellpipe triton start --repo triton_repo $(TRITON_PORTS)
	status=0; cellpipe triton verify --split test || status=$$?; \
	  [ $$status -ne 0 ] || cellpipe score outputs/demo_inbox --out outputs/demo_results \
	    --compare-voc data/bccd/Annotations || status=$$?; \
	  cellpipe triton stop; exit $$status
	@echo "Manifest:   outputs/ingest/manifest.parquet   (rejected: outputs/ingest/rejected.csv)"
	@echo "Shards:     outputs/preprocess/shards/        (preview: outputs/preprocess/preview.png)"
	@echo "Model:      models/classifier/model.pt        (curves: outputs/train/curves.png)"
	@echo "Evaluation: outputs/evaluate/                 (confusion_matrix.png, reliability.png, mistakes.png)"
	@echo "Served:     triton_repo/                      (ONNX + card: outputs/export/, report: outputs/publish/report.json)"
	@echo "Scored:     outputs/demo_results/             (summary.csv, slides/*/overlay.png, objects.parquet, report.json)"

## test: the whole test suite, slow end-to-end tests included (what CI runs)
test: venv
	$(BIN)/pytest

## test-fast: skip the tests marked slow
test-fast: venv
	$(BIN)/pytest -m "not slow"

lint: venv
	$(BIN)/ruff check src tests bench flows

## bench: the benchmarks behind the README's tables (need ../shared/datasets; ~3 h on 2 cores)
bench: venv
	$(BIN)/python bench/ingest_blood_cells.py
	$(BIN)/python bench/feature_depth.py
	$(BIN)/python bench/train_real.py
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/slides.py
	$(BIN)/python bench/gan.py

## lock: re-resolve every dependency and rewrite requirements.lock (needs the registry)
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	.lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^cellpipe' > requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) outputs .pytest_cache .cellpipe
