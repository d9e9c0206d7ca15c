# The two commands of the README: `make demo` (the main job on the embedded toy data) and
# `make test`. Each installs whatever is missing first, and does nothing more when all is there.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fasttricks-installed
APT_PACKAGES := libturbojpeg0-dev libopencv-dev pkg-config
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-min setup system-deps lint gpu-bundle bench-gpu gpu-tests gpu-rehearsal

demo: $(STAMP)
	$(VENV)/bin/fasttricks train --recipe winner --data toy --override pipelines/overrides/toy-winner.yaml \
		--out runs/demo --overwrite

# Both cores: two pytest processes, whole modules each, the slowest first (tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest -q --durations=25 -n 2 --dist loadfile --no-loadscope-reorder

# The tests whose behaviour depends on a dependency's version, at the lower bounds pyproject.toml
# allows (constraints-min.txt, every dependency): .venv-min/ sees .venv's packages (a .pth file)
# with those pinned over them. One test file or more per dependency: pytorch-optimizer (sam),
# kornia (augmix, syncguard), typer and rich (docs: every command's --help), pydantic and PyYAML
# (recipes), FFCV, numba, numpy, Pillow and OpenCV (beton, loader), timm (models), robustness
# (adversarial), safetensors (averaging), matplotlib (preview), scikit-image (toy),
# brainscore-vision (brainscore).
MIN_VENV := .venv-min
MIN_TESTS := tests/test_sam.py tests/test_augmix.py tests/test_syncguard.py tests/test_docs.py tests/test_recipes.py \
	tests/test_beton.py tests/test_loader.py tests/test_models.py tests/test_adversarial.py tests/test_averaging.py \
	tests/test_preview.py tests/test_toy.py tests/test_brainscore.py
test-min: $(STAMP) constraints-min.txt
	[ -x $(MIN_VENV)/bin/python ] || python3 -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -c "import site, sys; open(site.getsitepackages()[0] + '/main-venv.pth', 'w').write(sys.argv[1])" \
		"$$($(PY) -c 'import site; print(site.getsitepackages()[0])')"
	$(MIN_VENV)/bin/python -m pip install -q --no-deps -r constraints-min.txt > $(MIN_VENV)/install.log 2>&1 \
		|| { tail -20 $(MIN_VENV)/install.log; exit 1; }
	$(MIN_VENV)/bin/python -c "from importlib.metadata import version as v; import re; print('lower bounds:', \
		', '.join(f'{n} {v(n)}' for n in re.findall(r'^([A-Za-z0-9_.-]+)==', open('constraints-min.txt').read(), re.M)))"
	$(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider $(MIN_TESTS)

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check fasttricks tests benchmarks

# Every GPU figure: `make gpu-bundle` here (wheels a bare GPU machine lacks, into .gpu-bundle/),
# then `make bench-gpu` and `make gpu-tests` on the GPU machine, with .gpu-bundle/ carried along
# (benchmarks/gpu_suite.py; RESULTS=$$OUT there brings the results back). `make gpu-rehearsal` runs the same here, on the CPU,
# in a copy of the GPU machine's Python (benchmarks/gpu_rehearsal.sh); CI runs it.
RESULTS := benchmarks/results
gpu-bundle:
	bash benchmarks/gpu_bundle.sh .gpu-bundle

bench-gpu:
	python3 benchmarks/gpu_suite.py $(if $(wildcard .gpu-bundle/*.whl),--bundle .gpu-bundle) --results $(RESULTS)

# The GPU tests (pytest -m gpu), a call of their own: with the figures they do not fit 8 minutes.
gpu-tests:
	python3 benchmarks/gpu_suite.py --suite tests $(if $(wildcard .gpu-bundle/*.whl),--bundle .gpu-bundle) \
		--results $(RESULTS)

gpu-rehearsal: system-deps
	bash benchmarks/gpu_rehearsal.sh $(RESULTS)

# FFCV compiles its C extension against libturbojpeg and OpenCV found through pkg-config.
system-deps:
	@if pkg-config --exists libturbojpeg opencv4 2>/dev/null; then \
		echo "system packages present: $(APT_PACKAGES)"; \
	else \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES); \
	fi

# Re-installs only when pyproject.toml or constraints.txt changed since the last install.
# constraints.txt pins the exact set CI runs; pyproject.toml itself holds ranges.
# pip's and the builds' own warnings (FFCV compiles from source) go to .venv/install.log, shown
# only when the install fails.
# AutoAttack's library, apart and --no-deps: its requests~=2.25.1 pin (for downloads it never
# imports) conflicts with the rest; it needs only torch, numpy and scipy (docs/install.md).
TORCHATTACKS := torchattacks==3.5.1
$(STAMP): pyproject.toml constraints.txt Makefile | system-deps
	[ -x $(PY) ] || python3 -m venv $(VENV)
	@echo "installing fasttricks and its dependencies into $(VENV) (log: $(VENV)/install.log)"
	@{ $(PY) -m pip install -q --upgrade pip && \
	   $(PY) -m pip install -q -c constraints.txt -e '.[dev]' && \
	   $(PY) -m pip install -q --no-deps $(TORCHATTACKS); } > $(VENV)/install.log 2>&1 \
	   || { tail -40 $(VENV)/install.log; echo "install failed: see $(VENV)/install.log"; exit 1; }
	touch $(STAMP)
