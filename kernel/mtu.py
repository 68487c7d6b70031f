"""MTU arithmetic: how much room VXLAN, and ESP around it, leave for the containers' packets."""

# RFC 7348 encapsulation over IPv4: outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14 = 50 bytes.
VXLAN_OVERHEAD = 50

# RFC 4303 transport-mode ESP with rfc4106(gcm(aes)), over IPv4: outer IPv4 20 + ESP header 8 (SPI, sequence) +
# IV 8 + ICV 16 around a payload padded to a multiple of 4 that carries the 2-byte trailer (pad length, next
# header) and the UDP datagram: UDP 8 + VXLAN 8 + inner Ethernet 14 + the inner packet.
_ESP_FIXED = 20 + 8 + 8 + 16
_PAYLOAD_FIXED = 2 + 8 + 8 + 14


def vxlan_mtu(underlay_mtu: int) -> int:
    """The inner MTU of a cleartext VXLAN network over an underlay of this MTU: 1450 for 1500."""
    return underlay_mtu - VXLAN_OVERHEAD


def inner_mtu(underlay_mtu: int) -> int:
    """The largest inner (container) MTU whose encrypted VXLAN packet fits the underlay MTU: 1416 for 1500."""
    return ((underlay_mtu - _ESP_FIXED) // 4) * 4 - _PAYLOAD_FIXED
