# queuectl: make test | make lint | make bench | make install PREFIX=/usr/local
PYTHON ?= python3
PREFIX ?= /usr/local
BINDIR = $(PREFIX)/bin
LIBDIR = $(PREFIX)/lib/queuectl

.PHONY: test lint bench install uninstall

test:
	$(PYTHON) test_queuectl.py

lint:
	ruff check --isolated --select E4,E7,E9,F,W,B,PLE --ignore B905 --line-length 100 queuectl.py test_queuectl.py bench_queuectl.py
	vermin --no-tips --violations --target=3.10- queuectl.py test_queuectl.py bench_queuectl.py
	$(PYTHON) .ci/stdlib_only.py queuectl.py test_queuectl.py bench_queuectl.py

bench:
	$(PYTHON) bench_queuectl.py

# The installed command imports queuectl from LIBDIR, so it runs from cached
# bytecode instead of compiling the whole file on every start. Its
# interpreter must work for every user of the box (a service user too): the
# one that runs make if anyone can reach it, else the first of
# /usr/bin/python3 and /usr/local/bin/python3 that is 3.10+ and reachable.
define PICK_PYTHON
import os, subprocess, sys
def public(path, bits):
    path = os.path.realpath(path)
    if os.stat(path).st_mode & bits != bits:
        return False
    while path != "/":
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & 0o001:
            return False
    return True
for exe in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
    if not os.path.exists(exe) or not public(exe, 0o005):
        continue
    lib = subprocess.run([exe, "-I", "-c", "import os, sys; print(sys.version_info >= (3, 10)"
                          " and os.__file__ or '')"], capture_output=True, text=True).stdout.strip()
    if lib and public(lib, 0o004):
        print(exe)
        break
else:
    sys.stderr.write(f"make install: no Python 3.10+ that every user can run; using {sys.executable}\n")
    print(sys.executable)
endef
export PICK_PYTHON

install:
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBDIR)
	install -m 0644 queuectl.py $(DESTDIR)$(LIBDIR)/queuectl.py
	install -m 0644 README.md $(DESTDIR)$(LIBDIR)/README.md
	interp=$$($(PYTHON) -c "$$PICK_PYTHON") && \
	$$interp -m compileall -q $(DESTDIR)$(LIBDIR)/queuectl.py && \
	chmod -R a+rX $(DESTDIR)$(LIBDIR) && \
	printf '#!%s -I\nimport sys\nsys.path.insert(0, "%s")\nimport queuectl\nsys.exit(queuectl.main())\n' \
		"$$interp" "$(LIBDIR)" > $(DESTDIR)$(BINDIR)/queuectl
	chmod 0755 $(DESTDIR)$(BINDIR)/queuectl

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/queuectl
	rm -rf $(DESTDIR)$(LIBDIR)
