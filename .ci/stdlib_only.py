"""Fail when a file imports anything outside the standard library."""
import ast
import sys

LOCAL = {"queuectl", "test_queuectl", "bench_queuectl"}
bad = []
for path in sys.argv[1:]:
    try:
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
    except FileNotFoundError:
        continue
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in LOCAL:
                bad.append(f"{path}:{node.lineno}: imports {name}")
if bad:
    print("\n".join(bad))
    sys.exit(1)
print(f"stdlib only: {', '.join(sys.argv[1:])}")
