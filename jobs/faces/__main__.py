"""``python -m jobs.faces``: the faces command line (:mod:`jobs.faces.cli`)."""

from jobs.faces.cli import app

if __name__ == "__main__":
    app()
