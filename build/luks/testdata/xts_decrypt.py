# Decrypts an aes-xts-plain64 payload with python3-cryptography, an
# implementation independent of cwrun's, for luks_test.go.
# stdin: the volume key in hex. argv: image, payload offset, payload size,
# sector size, output path. The tweak is the 512-byte sector number, as
# dm-crypt's plain64 IV without iv_large_sectors.
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

key = bytes.fromhex(sys.stdin.readline().strip())
path, off, size, ss, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
with open(path, "rb") as f:
    f.seek(off)
    data = f.read(size)
if len(data) != size:
    sys.exit("short read: %d of %d bytes" % (len(data), size))
res = bytearray()
for i in range(0, size, ss):
    tweak = (i // 512).to_bytes(16, "little")
    d = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
    res += d.update(data[i:i + ss]) + d.finalize()
with open(out, "wb") as f:
    f.write(res)
