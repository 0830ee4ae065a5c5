"""Download an entity's `spec.source` (Hugging Face Hub or S3) into a directory, once.

One library for every place that fetches: `kubetune run` (into a local cache) and the
operator's initializer (into the entity's claim). It sits beside `kubetune_api` rather than
inside `kubetune` (which brings kopf) or `kubetune_api` (pydantic only, copied into the trainer
images): an initializer image copies `kubetune_api` and this package and installs
requirements/fetch.txt, nothing more.

    result = fetch_source(spec.source, Path("/data/models/smol"), progress=print)
    result.path  # /data/models/smol/main-3f2a9c1b7d0e: the files, and nothing else

Layout under `root`, for one version of a source (see `version_name`):
    <version>/                 the files, each moved in place only when complete
    <version>.complete.json    the completion marker: the source, the resolved revision or
                               ETags, the counts; present = done, and a later call is a no-op
    <version>.partial/         while downloading: partial files and the journal of finished
                               ones, so that a killed download resumes where it stopped
    <version>.lock             one downloader per version at a time
"""

from kubetune_fetch.errors import FetchError, FetchErrorReason
from kubetune_fetch.layout import (
    Marker,
    cache_root,
    read_marker,
    source_identity,
    version_name,
)
from kubetune_fetch.transfer import FetchResult, Progress, ProgressCallback, S3Credentials, fetch_source

__all__ = [
    "FetchError",
    "FetchErrorReason",
    "FetchResult",
    "Marker",
    "Progress",
    "ProgressCallback",
    "S3Credentials",
    "cache_root",
    "fetch_source",
    "read_marker",
    "source_identity",
    "version_name",
]
