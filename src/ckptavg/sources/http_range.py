"""A file on a Hub read as a seekable stream, by HTTP range requests: how plans read weight headers.

A checkpoint's header is small and sits at known places: a safetensors header at the start; a torch
zip's directory at the end and its pickle near the start. Reading them through aligned, cached blocks
costs two or three requests per file, where downloading the file would cost gigabytes. Requests go
through huggingface_hub's session and retry policy, so tokens, redirects, proxies and transient
failures are handled as for any download.
"""

from __future__ import annotations

import io

BLOCK = 1 << 16


class RangeReader(io.RawIOBase):
    def __init__(self, url: str, size: int, headers: dict[str, str], *, block: int = BLOCK) -> None:
        self.url = url
        self.size = size
        self.headers = headers
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
            from huggingface_hub.utils import hf_raise_for_status, http_backoff

            first = index * self.block
            last = min(first + self.block, self.size) - 1
            response = http_backoff("GET", self.url, headers={**self.headers, "Range": f"bytes={first}-{last}"})
            hf_raise_for_status(response)
            body = response.content
            if response.status_code == 200:  # a server that ignores Range sends the whole file
                body = body[first : last + 1]
            if len(body) != last + 1 - first:
                raise OSError(
                    f"{self.url}: asked for bytes {first}-{last} and got {len(body)} bytes; "
                    "the file's size differs from what the server announced"
                )
            data = self.blocks[index] = body
        return data
