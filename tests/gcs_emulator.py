"""A Cloud Storage emulator for the tests: gcp-storage-emulator, in memory, with
the parts of GCS's contract it lacks and vlpjax's clients rely on:

- downloads carry `x-goog-generation` (tensorstore tracks generations by it);
- uploads honour `ifGenerationMatch` (412 otherwise; tensorstore's OCDBT
  manifest updates are such conditional writes, and lose data without them);
- `objects.moveTo` answers 400 at once (the emulator's 501 makes gcsfs retry for
  half a minute before it falls back to copy and delete).

The emulator serves one request at a time, so the checks need no lock.
"""
from __future__ import annotations

import contextlib
import http
import socket
from typing import Iterator

from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _generation(storage, bucket: str, name: str) -> str:
  try:
    return storage.get_file_obj(bucket, name)['generation']
  except NotFound:
    return '0'


def _download(original):
  def download(request, response, storage, *args, **kwargs):
    params = request.params
    response['x-goog-generation'] = _generation(storage, params['bucket_name'],
                                                params['object_id'])
    return original(request, response, storage, *args, **kwargs)
  return download


def _insert(original):
  def insert(request, response, storage, *args, **kwargs):
    expected = request.query.get('ifGenerationMatch')
    name = request.query.get('name')
    if expected and name and _generation(storage, request.params['bucket_name'],
                                         name[0]) != expected[0]:
      response.status = http.HTTPStatus.PRECONDITION_FAILED
      return None
    return original(request, response, storage, *args, **kwargs)
  return insert


def _refuse(request, response, storage, *args, **kwargs):
  del request, storage, args, kwargs
  response.status = http.HTTPStatus.BAD_REQUEST


@contextlib.contextmanager
def serve(bucket: str) -> Iterator[str]:
  """Runs the emulator with `bucket`; yields its URL."""
  saved = (emulator_server.HANDLERS, objects.download, objects.insert)
  # Module attributes too: objects.get(alt=media) and the router's upload
  # fallback call them by name.
  objects.download, objects.insert = _download(saved[1]), _insert(saved[2])
  wrapped = {saved[1]: objects.download, saved[2]: objects.insert}
  routes = tuple((regex, {method: wrapped.get(handler, handler)
                          for method, handler in handlers.items()})
                 for regex, handlers in emulator_server.HANDLERS)
  emulator_server.HANDLERS = (
      (r'^/storage/v1/b/[-.\w]+/o/.*/moveTo/o/.*$', {'POST': _refuse}), *routes)
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    port = probe.getsockname()[1]
  server = emulator_server.create_server('localhost', port, in_memory=True,
                                         default_bucket=bucket)
  server.start()
  try:
    yield f'http://localhost:{port}'
  finally:
    server.stop()
    emulator_server.HANDLERS, objects.download, objects.insert = saved
