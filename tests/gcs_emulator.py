"""Runs ``gcp-storage-emulator`` for the tests, with the object-generation headers that
Google Cloud Storage sends on every download (``x-goog-generation``,
``x-goog-metageneration``) and the emulator leaves out; TensorStore, which writes lmjax's
checkpoints, needs them to read an object back.

  python tests/gcs_emulator.py HOST PORT
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # noqa: BLE001 - a missing object: the emulator has answered 404
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = download  # before the server module binds its routes

from gcp_storage_emulator.server import create_server  # noqa: E402

if __name__ == "__main__":
  server = create_server(sys.argv[1], int(sys.argv[2]), in_memory=True)
  server.run()
