"""gcp-storage-emulator, run as tests/object_stores.py starts it: `python tests/gcs_emulator.py PORT BUCKET`.

Two answers real GCS gives that the emulator (2026.7.19) leaves out are added here, before its server module
reads its handlers, so tensorstore and the run lease see what they see on GCS:

* a media download carries the object's generation (`x-goog-generation`, `x-goog-metageneration` headers).
  Without it tensorstore reads every object as generation 0 and a later conditional read of an OCDBT manifest
  fails with "Malformed StorageGeneration" (measured: an Orbax save of a train state, the third step).
* an upload with `ifGenerationMatch` is refused with 412 when the object's generation differs (0: when it
  exists), as GCS does; the emulator ignores the precondition and overwrites, so "create only if absent" (the
  run lease, storage.create_exclusive) could not be tested on it.
"""

import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _generation(storage, bucket: str, name: str) -> str:
    """The object's generation, '0' when there is none (GCS's meaning of ifGenerationMatch=0)."""
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def _with_generation_headers(download):
    def handler(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])

    return handler


def _with_generation_precondition(insert):
    def handler(request, response, storage, *args, **kwargs):
        wanted = request.query.get("ifGenerationMatch")
        if wanted:
            data = request.data  # read (and kept) even when refused: an unread body would end the connection
            name = request.query["name"][0] if "name" in request.query else None
            if name is None and isinstance(data, dict):
                name = data.get("meta", {}).get("name")
            if name is not None and _generation(storage, request.params["bucket_name"], name) != wanted[0]:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you "
                                                                  "specified did not hold."}})
                return
        insert(request, response, storage, *args, **kwargs)

    return handler


objects.download = _with_generation_headers(objects.download)
objects.insert = _with_generation_precondition(objects.insert)

# imported only now: its route table takes the handlers patched above
from gcp_storage_emulator.server import create_server

if __name__ == "__main__":
    port, bucket = int(sys.argv[1]), sys.argv[2]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.run()
