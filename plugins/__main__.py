"""``python plugins`` lists the built-in plugins (kind, name, ``module:Class``), importing none.

This folder is the plugins' entry point only. The code is the package ``patchd.plugins``
(``patchd/plugins/``). See README.md beside this file for writing your own.
"""

from patchd.plugins.catalog import TABLES

if __name__ == "__main__":
    for kind, table in TABLES.items():
        for name, target in table.items():
            print(f"{kind:<10} {name:<10} {target}")
