# upsync — see README.md. Targets: deps, build, test, package, demo, demo-stack, bench, fuzz, clean.
SHELL := /bin/bash
.DEFAULT_GOAL := build
.PHONY: deps build build-nginx128 test-nginx128 test unit-test integration-test demo demo-stack bench bench-micro bench-e2e fuzz clean nginx-objs check package

# The nginx tree the module is compiled against. Left empty, `make` prepares Debian's nginx-dev
# tree under build/nginx (scripts/nginx-objs.sh). Set both to build against any other
# configured nginx source tree.
NGINX_SOURCE_DIR ?=
NGINX_BUILD_DIR ?=
CARGO ?= cargo
CARGO_FLAGS ?= --release --locked

# A second nginx line: `make build NGINX=1.28` builds nginx 1.28 from the `nginx-src` crate's
# vendored source (offline, ~70 s the first time) and the module against it, with cargo's own
# target dir target/nginx-1.28 (the Debian build in target/release is left alone), into
# build/nginx-1.28/sbin/nginx, build/nginx-1.28/ngx_http_upsync_module.so and
# build/nginx-1.28/ngx_stream_upsync_module.so (that nginx has stream built in).
# `make test` runs the module's integration tests against both nginx lines (test-nginx128).
NGINX ?=
NGINX128_OUT = build/nginx-1.28
NGINX128_TARGET = target/nginx-1.28

ifeq ($(strip $(NGINX_SOURCE_DIR)),)
NGINX_ENV = eval "$$(scripts/nginx-objs.sh | sed 's/^/export /')"
else
NGINX_ENV = export NGINX_SOURCE_DIR="$(NGINX_SOURCE_DIR)" NGINX_BUILD_DIR="$(NGINX_BUILD_DIR)"
endif

deps:
	scripts/deps.sh

build:
ifeq ($(NGINX),1.28)
	@$(MAKE) --no-print-directory build-nginx128
else
	@mkdir -p build
	$(NGINX_ENV) && $(CARGO) build $(CARGO_FLAGS) --workspace --bins --lib
	@install -m 0755 target/release/libngx_http_upsync_module.so build/ngx_http_upsync_module.so
	@install -m 0755 target/release/libngx_stream_upsync_module.so build/ngx_stream_upsync_module.so
	@for b in upsync-sidecar upsync-dns upsync-backend; do install -m 0755 target/release/$$b build/$$b; done
	@echo "built: build/ngx_http_upsync_module.so build/ngx_stream_upsync_module.so build/upsync-sidecar build/upsync-dns build/upsync-backend"
endif

# nginx 1.28 (nginx-sys's `vendored` feature through the module's) and the module against it.
# NGINX_SOURCE_DIR/NGINX_BUILD_DIR must be unset for nginx-sys to build the vendored tree.
build-nginx128:
	@mkdir -p $(NGINX128_OUT)/sbin
	env -u NGINX_SOURCE_DIR -u NGINX_BUILD_DIR $(CARGO) build $(CARGO_FLAGS) --target-dir $(NGINX128_TARGET) \
		-p ngx_http_upsync_module -p ngx_stream_upsync_module \
		--features ngx_http_upsync_module/vendored,ngx_stream_upsync_module/vendored --lib
	@bin="$$(ls -t $(NGINX128_TARGET)/release/build/nginx-sys-*/out/objs/nginx 2>/dev/null | head -1)"; \
	if [ -z "$$bin" ]; then echo "build-nginx128: nginx-sys built no nginx under $(NGINX128_TARGET)/release/build/nginx-sys-*/out/objs" >&2; exit 1; fi; \
	install -m 0755 "$$bin" $(NGINX128_OUT)/sbin/nginx
	@install -m 0755 $(NGINX128_TARGET)/release/libngx_http_upsync_module.so $(NGINX128_OUT)/ngx_http_upsync_module.so
	@install -m 0755 $(NGINX128_TARGET)/release/libngx_stream_upsync_module.so $(NGINX128_OUT)/ngx_stream_upsync_module.so
	@echo "built: $(NGINX128_OUT)/sbin/nginx ($$($(NGINX128_OUT)/sbin/nginx -v 2>&1)) $(NGINX128_OUT)/ngx_http_upsync_module.so $(NGINX128_OUT)/ngx_stream_upsync_module.so"

# Unit tests, then the integration tests against the binaries `make build` left in build/.
# One release build serves both. nginx 1.28 is built first: tests/tests/nginx_resolve.rs runs
# its `resolve` beside the Debian build.
test: build build-nginx128
	$(NGINX_ENV) && $(CARGO) test $(CARGO_FLAGS) --workspace --no-fail-fast 2>&1 | scripts/test-summary.sh
	@$(MAKE) --no-print-directory test-nginx128

# The module's integration tests (tests/tests/module_*.rs) against nginx 1.28 and the module
# built for it (the harness takes nginx and the module from UPSYNC_NGINX / UPSYNC_MODULE).
test-nginx128: build-nginx128
	@echo "==== module integration tests against $$($(NGINX128_OUT)/sbin/nginx -v 2>&1) ===="
	$(NGINX_ENV) && export UPSYNC_NGINX="$(CURDIR)/$(NGINX128_OUT)/sbin/nginx" \
		UPSYNC_MODULE="$(CURDIR)/$(NGINX128_OUT)/ngx_http_upsync_module.so" \
		UPSYNC_STREAM_MODULE="$(CURDIR)/$(NGINX128_OUT)/ngx_stream_upsync_module.so" && \
		$(CARGO) test $(CARGO_FLAGS) -p upsync-tests --test 'module_*' --no-fail-fast 2>&1 | scripts/test-summary.sh

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

# Each package is also checked alone (its library and binaries, without dev-dependencies):
# a workspace build unifies the features every package asks of a dependency, which hides a
# package that forgot one of its own (`cargo build -p upsync-discovery` once failed so).
check:
	$(CARGO) fmt --all -- --check
	$(NGINX_ENV) && $(CARGO) clippy $(CARGO_FLAGS) --workspace --all-targets -- -D warnings
	$(NGINX_ENV) && for p in $$($(CARGO) metadata --locked --no-deps --format-version 1 \
		| python3 -c 'import json, sys; print(*(p["name"] for p in json.load(sys.stdin)["packages"]))'); do \
		$(CARGO) check $(CARGO_FLAGS) -p $$p || exit 1; done

clean:
	rm -rf build
	$(CARGO) clean
