# upsync — see README.md. Targets: deps, build, test, package, demo, demo-stack, bench, fuzz, clean.
SHELL := /bin/bash
.DEFAULT_GOAL := build
.PHONY: deps build test unit-test integration-test demo demo-stack bench bench-micro bench-e2e fuzz clean nginx-objs check package

# The nginx tree the module is compiled against. Left empty, `make` prepares Debian's nginx-dev
# tree under build/nginx (scripts/nginx-objs.sh). Set both to build against any other
# configured nginx source tree.
NGINX_SOURCE_DIR ?=
NGINX_BUILD_DIR ?=
CARGO ?= cargo
CARGO_FLAGS ?= --release --locked

ifeq ($(strip $(NGINX_SOURCE_DIR)),)
NGINX_ENV = eval "$$(scripts/nginx-objs.sh | sed 's/^/export /')"
else
NGINX_ENV = export NGINX_SOURCE_DIR="$(NGINX_SOURCE_DIR)" NGINX_BUILD_DIR="$(NGINX_BUILD_DIR)"
endif

deps:
	scripts/deps.sh

build:
	@mkdir -p build
	$(NGINX_ENV) && $(CARGO) build $(CARGO_FLAGS) --workspace --bins --lib
	@install -m 0755 target/release/libngx_http_upsync_module.so build/ngx_http_upsync_module.so
	@for b in upsync-sidecar upsync-dns upsync-backend; do install -m 0755 target/release/$$b build/$$b; done
	@echo "built: build/ngx_http_upsync_module.so build/upsync-sidecar build/upsync-dns build/upsync-backend"

# Unit tests, then the integration tests against the binaries `make build` left in build/.
# One release build serves both.
test: build
	$(NGINX_ENV) && $(CARGO) test $(CARGO_FLAGS) --workspace --no-fail-fast 2>&1 | scripts/test-summary.sh

# Debian packages of the build for Debian 12's nginx in build/packages/ (scripts/package.sh:
# dpkg-deb from staged trees; packaging files in packaging/).
package: build
	scripts/package.sh build/packages

demo: build
	scripts/demo.sh

demo-stack: build
	scripts/demo-stack.sh

bench: build bench-micro bench-e2e

bench-micro:
	$(NGINX_ENV) && $(CARGO) bench --locked -p upsync-benches

bench-e2e:
	scripts/bench/run-all.sh

# Every cargo-fuzz target for FUZZ_SECONDS each (FUZZ_TARGETS: a space-separated subset).
# Installs cargo-fuzz on first use. Crashes are kept in fuzz/regressions/, which `make test`
# runs (tests/tests/fuzz_regressions.rs).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?=
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh $(FUZZ_TARGETS)

check:
	$(CARGO) fmt --all -- --check
	$(NGINX_ENV) && $(CARGO) clippy $(CARGO_FLAGS) --workspace --all-targets -- -D warnings

clean:
	rm -rf build
	$(CARGO) clean
