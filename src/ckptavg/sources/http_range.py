"""A file on a Hub read as a seekable stream, by HTTP range requests: how plans read weight headers.

A checkpoint's header is small and sits at known places: a safetensors header at the start; a torch
zip's directory at the end and its pickle near the start. Reading them through aligned, cached blocks
costs two or three requests per file, where downloading the file would cost gigabytes. Requests go
through huggingface_hub's session (tokens, redirects, proxies as for any download) and ckptavg's retry
policy (``retry.py``), which retries 429, 5xx, dropped and stalled connections.
"""

from __future__ import annotations

import io

from ckptavg.sources.retry import BodyCutShort, RetryPolicy

BLOCK = 1 << 16


class RangeReader(io.RawIOBase):
    def __init__(
        self,
        url: str,
        size: int,
        headers: dict[str, str],
        *,
        retry: RetryPolicy | None = None,
        where: str = "",
        block: int = BLOCK,
    ) -> None:
        self.url = url
        self.size = size
        self.headers = headers
        self.retry = retry or RetryPolicy()
        self.where = where or url
        self.block = block
        self.pos = 0
        self.blocks: dict[int, bytes] = {}

    def warm(self, *, tail: bool) -> None:
        """Fetch the first and last blocks now, where a failure is still a plain Python exception: a
        torch zip's pickle sits near the start and its directory at the end, and an error raised while
        ``torch.load`` reads through us would come back wrapped in a RuntimeError."""
        self._block(0)
        if tail:
            self._block(max(self.size - 1, 0) // self.block)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.size - self.pos))
        done = 0
        while done < n:
            index, skip = divmod(self.pos + done, self.block)
            data = self._block(index)
            take = min(n - done, len(data) - skip)
            if take <= 0:
                raise OSError(f"{self.url}: the server sent fewer bytes than the file's listed size")
            view[done : done + take] = data[skip : skip + take]
            done += take
        self.pos += n
        return n

    def _block(self, index: int) -> bytes:
        data = self.blocks.get(index)
        if data is None:
            first = index * self.block
            last = min(first + self.block, self.size) - 1
            action = f"reading bytes {first}-{last} (its header)"
            body = self.retry.call(lambda: self._get(first, last), where=self.where, action=action)
            if len(body) != last + 1 - first:
                raise OSError(
                    f"{self.url}: asked for bytes {first}-{last} and got {len(body)} bytes; "
                    "the file's size differs from what the server announced"
                )
            data = self.blocks[index] = body
        return data

    def _get(self, first: int, last: int) -> bytes:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session, hf_raise_for_status

        response = get_session().get(
            self.url,
            headers={**self.headers, "Range": f"bytes={first}-{last}"},
            timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
            follow_redirects=True,
        )
        hf_raise_for_status(response)
        body = response.content
        promised = response.headers.get("Content-Length")
        if promised is not None and promised.isdigit() and len(body) < int(promised):
            raise BodyCutShort(f"{len(body)} of {promised} bytes")  # the HTTP library may pass a cut body
        if response.status_code == 200:  # a server that ignores Range sends the whole file
            body = body[first : last + 1]
        return body
