"""The twistd plugins are found, in the tree and in a fresh install."""

import os
import subprocess
import sys
import tempfile

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAPNAMES = {"arc-relay", "arc-agent", "arc-client", "arc-guard"}


class PluginTests(unittest.TestCase):
    def test_all_plugins_found(self):
        """An import error in the plugin module would hide a subcommand silently."""
        names = {plugin.tapname for plugin in getPlugins(IServiceMaker)}
        self.assertTrue(TAPNAMES <= names, "missing: %s" % (TAPNAMES - names,))

    def test_plugins_load_their_modules(self):
        for plugin in getPlugins(IServiceMaker):
            if plugin.tapname in TAPNAMES:
                options = plugin.options()
                self.assertIn("config", options)
                self.assertTrue(callable(plugin.makeService))


class FreshInstallTests(unittest.TestCase):
    """Install the package as the README says, in a new venv, and ask twistd."""

    timeout = 600

    def test_fresh_venv_install(self):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        venv = tempfile.mkdtemp(prefix="arc-venv-")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
        pip = os.path.join(venv, "bin", "pip")
        result = subprocess.run([pip, "install", "--quiet", ROOT], capture_output=True,
                                text=True, timeout=540, env=env)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        python = os.path.join(venv, "bin", "python")
        site = subprocess.run([python, "-c", "import twisted.plugins, os; print(os.path.dirname("
                               "twisted.plugins.__file__))"],
                              capture_output=True, text=True, cwd=venv, check=True,
                              env=env).stdout.strip()
        self.assertTrue(os.path.exists(os.path.join(site, "arc_plugins.py")))
        # The wheel carries the plugin module but never a generated dropin.cache.
        record = subprocess.run([python, "-m", "pip", "show", "-f", "arc"], capture_output=True,
                                text=True, cwd=venv, check=True, env=env).stdout
        self.assertIn("twisted/plugins/arc_plugins.py", record)
        # Every subpackage made it into the wheel (a forgotten one breaks a part).
        for module in ("arc/tunnel/session.py", "arc/guard/proxy.py", "arc/identity/oidc.py",
                       "arc/client/proxy.py", "arc/cli/main.py", "arc/testing/apiserver.py"):
            self.assertIn(module, record)
        self.assertNotIn("tests/", record)
        self.assertNotIn("dropin.cache", record)
        # Run outside the source tree, so only the installed copy can be found.
        twistd = os.path.join(venv, "bin", "twistd")
        out = subprocess.run([twistd, "--help"], capture_output=True, text=True, timeout=60,
                             cwd=venv, env={"PATH": os.environ.get("PATH", "")})
        self.assertEqual(out.returncode, 0, out.stderr)
        for name in TAPNAMES:
            self.assertIn(name, out.stdout)
        cli = subprocess.run([os.path.join(venv, "bin", "arc"), "--help"], capture_output=True,
                             text=True, timeout=60, cwd=venv, env=env)
        self.assertEqual(cli.returncode, 0, cli.stderr)
        self.assertIn("login", cli.stdout)
        help_out = subprocess.run([twistd, "arc-relay", "--help"], capture_output=True, text=True,
                                  timeout=60, cwd=venv, env=env)
        self.assertIn("--config", help_out.stdout)
