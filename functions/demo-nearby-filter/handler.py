"""demo-nearby-filter: a filter for the live-map demo.

A position is ``{"lat": 52.37, "lon": 4.89, ...}``. One more than RADIUS_KM from CENTER
returns None: nobody receives it, and the publisher's ack says ``filteredBy``. Anything that
is not a position raises, so the publisher gets a ``function_error`` and the app's admins
see it (apps/admin/).
"""

import math

CENTER = (52.3731, 4.8926)  # Dam Square, Amsterdam (also in demo-enrich-distance)
RADIUS_KM = 2.0
EARTH_RADIUS_KM = 6371.0


def distance_km(a, b):
    """Great-circle (haversine) distance between two (lat, lon) points, in km."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + \
        math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(h))


def position(event):
    """(lat, lon) of a position message; ValueError for anything else."""
    lat = event.get("lat") if isinstance(event, dict) else None
    lon = event.get("lon") if isinstance(event, dict) else None
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lat, lon))
    if not numbers or not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise ValueError(f"not a position: want numbers lat in [-90, 90] and lon in "
                         f"[-180, 180], got lat={lat!r}, lon={lon!r}")
    return lat, lon


def handler(event, context):
    if distance_km(CENTER, position(event)) > RADIUS_KM:
        return None
    return event
