"""``python -m jobs.faces``: the faces command line (:mod:`jobs.faces.cli`)."""

from infra.cli import run_tool
from jobs.faces.cli import app

if __name__ == "__main__":
    run_tool(app)
