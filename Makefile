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
# bytecode instead of compiling the whole file on every start.
install:
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBDIR)
	install -m 0644 queuectl.py $(DESTDIR)$(LIBDIR)/queuectl.py
	$(PYTHON) -m compileall -q $(DESTDIR)$(LIBDIR)/queuectl.py
	interp=$$($(PYTHON) -c 'import sys; print(sys.executable)') && \
	printf '#!%s -I\nimport sys\nsys.path.insert(0, "%s")\nimport queuectl\nsys.exit(queuectl.main())\n' \
		"$$interp" "$(LIBDIR)" > $(DESTDIR)$(BINDIR)/queuectl
	chmod 0755 $(DESTDIR)$(BINDIR)/queuectl

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/queuectl
	rm -rf $(DESTDIR)$(LIBDIR)
