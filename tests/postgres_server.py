"""A PostgreSQL server for the distributed-search tests.

CI (.ci/run) installs Debian's ``postgresql``, starts its cluster, creates a role and a
database and exports ``AUTOCOMP_TEST_POSTGRES``. Elsewhere the tests that need it are
skipped, with the reason, unless ``CI`` is set: there a missing server is a failure.
"""

import os
import uuid

from helpers import unavailable

ENV = "AUTOCOMP_TEST_POSTGRES"
HOW = (f"set {ENV}=postgresql://USER:PASSWORD@HOST:PORT/DB (CI starts Debian's postgresql "
       "and sets it; see .ci/run)")


def postgres_url() -> str:
    """The test server's URL; skips the calling test (fails it under CI) when there is none
    or it does not answer."""
    url = os.environ.get(ENV, "").strip()
    problem = None if url else f"no PostgreSQL server for this test: {HOW}"
    if url:
        import psycopg2

        try:
            psycopg2.connect(url.replace("+psycopg2://", "://"), connect_timeout=5).close()
        except psycopg2.Error as err:
            problem = f"the PostgreSQL server in {ENV} does not answer: {str(err).strip().splitlines()[0]}"
    if problem is None:
        return url
    unavailable(problem)


def study_name(prefix: str = "test") -> str:
    """A study name no other test (or earlier run against the same database) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
