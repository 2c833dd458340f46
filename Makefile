# robret: `make demo` and `make test` do all set-up themselves on a fresh machine (the PostgreSQL
# catalog tests install Debian's postgresql server themselves when it is missing, see tests/_postgres_fixtures.py).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.robret-installed

.PHONY: demo test install ui bench clean browser-deps photos

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# PyPI's torch build (not a local CPU-only wheel): torchvision, which dreamsim imports, needs it.
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[test,postgres]'
	$(PY) -c "import torch, torchvision, faiss, dreamsim, pyautoattack, streamlit, sqlalchemy"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/robret demo

test: $(STAMP) browser-deps
	$(PY) -m pytest

# The real-browser UI test's needs: Debian's chromium (apt-get) and playwright (pip); quick when present.
browser-deps: $(STAMP)
	bash tests/browser/setup.sh $(PY)

# Real photographs from Debian's wallpaper packages (training split and held-out benchmark; see
# encoder/data/photos.py): installs the packages (a no-op when present), then checks every recorded
# file's SHA-256. `make test` does not need them.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
photos: $(STAMP)
	pk="$$($(PY) -m encoder.data.photos packages)" && { dpkg -s $$pk >/dev/null 2>&1 || { $(SUDO) apt-get update && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends $$pk; }; }
	$(PY) -m encoder.data.photos check

ui: $(STAMP)
	$(VENV)/bin/robret ui

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
