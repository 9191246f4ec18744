"""demo-enrich-distance: enrichment for the live-map demo.

Adds what a map viewer wants to know and the publisher did not send:

    {"lat": 52.3752, "lon": 4.884, ...}
    -> {..., "distanceKm": 0.63, "bearing": 292, "compass": "W",
        "near": {"name": "Anne Frank House", "distanceKm": 0.0}}

``distanceKm`` and ``bearing`` (degrees clockwise from north) are measured from CENTER;
``near`` is the closest place in PLACES, a small built-in table (no geocoding service).
Runs after demo-nearby-filter, which has already refused anything that is not a position.
"""

import math

CENTER = (52.3731, 4.8926)  # Dam Square, Amsterdam (also in demo-nearby-filter)
EARTH_RADIUS_KM = 6371.0
COMPASS = ("N", "NE", "E", "SE", "S", "SW", "W", "NW")
PLACES = {
    "Dam Square": (52.3731, 4.8926),
    "Amsterdam Centraal": (52.3791, 4.9003),
    "Anne Frank House": (52.3752, 4.8840),
    "Noordermarkt": (52.3795, 4.8860),
    "Rembrandtplein": (52.3663, 4.8966),
    "Waterlooplein": (52.3676, 4.9020),
    "Leidseplein": (52.3641, 4.8828),
    "NEMO Science Museum": (52.3738, 4.9123),
    "A'DAM Tower": (52.3840, 4.9020),
    "Rijksmuseum": (52.3600, 4.8852),
    "Heineken Experience": (52.3578, 4.8918),
    "Artis zoo": (52.3663, 4.9166),
    "Vondelpark": (52.3580, 4.8686),
    "Oosterpark": (52.3603, 4.9200),
}


def distance_km(a, b):
    """Great-circle (haversine) distance between two (lat, lon) points, in km."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + \
        math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(h))


def bearing_deg(a, b):
    """Initial compass bearing from a to b, degrees clockwise from north (0-359)."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    y = math.sin(lon2 - lon1) * math.cos(lat2)
    x = math.cos(lat1) * math.sin(lat2) - math.sin(lat1) * math.cos(lat2) * math.cos(lon2 - lon1)
    return round(math.degrees(math.atan2(y, x))) % 360


def handler(event, context):
    here = (event["lat"], event["lon"])
    bearing = bearing_deg(CENTER, here)
    name, place = min(PLACES.items(), key=lambda item: distance_km(item[1], here))
    return {
        **event,
        "distanceKm": round(distance_km(CENTER, here), 2),
        "bearing": bearing,
        "compass": COMPASS[round(bearing / 45) % 8],
        "near": {"name": name, "distanceKm": round(distance_km(place, here), 2)},
    }
