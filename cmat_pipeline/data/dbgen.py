"""Deterministic synthetic AgentBench-DB ("dbbench") tasks.

    from cmat_pipeline.data.dbgen import generate_db_tasks, DB_TASK_TYPES, DOMAINS
    entries = generate_db_tasks(1000, seed=0, shard="train-00")            # every type, round-robin
    entries = generate_db_tasks(50, seed=0, shard="x", types=["ranking"])  # only some types
    entries = generate_db_tasks(50, seed=0, shard="x", domains=["flights"])  # only some table domains

Each entry is a dbbench task exactly as AgentBench ships them (one JSON object per line of a .jsonl file,
readable by `cmat_pipeline.envs.dbbench.load_tasks`), plus `id` (a content hash), `source`
("synth:<shard>") and `meta` (domain, template, phrasing, and the kind of every column, for augmentation).

Tables come from built-in domains (library loans, flights, football results, ...) with typed, realistic
columns. Labels are never written by hand: the gold SQL runs on a fresh `SQLiteBackend` database (the
environment itself) and SELECT labels are its flattened observation, INSERT/UPDATE/DELETE labels the gold
statement with `answer_md5` the table hash after it. The output depends only on (n, seed, shard, types, domains):
task i draws from its own `random.Random`, seeded by a SHA-256 of (seed, shard, i).

Constructs on which SQLite (with the backend's translation) and MySQL/MariaDB disagree are never generated:
BETWEEN (the backend casts only plain `column <op> number` comparisons), negative numeric literals (same
reason), CAST AS DECIMAL (MySQL returns Decimal objects), unrounded SUM/AVG over decimal values (float
summation order), ROUND at an exact half (half-even vs half-away), non-ASCII text (accent-insensitive
collations) and backslashes (MySQL string escapes).
"""

from __future__ import annotations

import ast
import datetime as dt
import functools
import hashlib
import json
import math
import operator
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, NamedTuple, Sequence

from cmat_pipeline.envs.dbbench import SELECT_SUBTYPES
from cmat_pipeline.envs.dbbench_oracle import _values
from cmat_pipeline.envs.sql_backends import SQLiteBackend, TableSpec

DB_TASK_TYPES: tuple[str, ...] = SELECT_SUBTYPES + ("INSERT", "UPDATE", "DELETE")
MODIFICATIONS = ("INSERT", "UPDATE", "DELETE")
MAX_VALUES = 5  # at most this many answer values per SELECT task
MAX_OBSERVATION = 700  # characters; the environment truncates at 800
EMPTY_TABLE_HASH = "[(None,)]"  # AgentBench's hash of a table without rows
_BACKEND = SQLiteBackend(timeout_s=5.0, max_chars=800)

# ------------------------------------------------------------------------------------- word lists

FIRST = ("Amara", "Ben", "Carlos", "Dana", "Elif", "Farah", "George", "Hana", "Ivan", "Julia", "Kenji", "Laila",
         "Marcus", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Samuel", "Tara", "Umar", "Vera", "Wen", "Xavier",
         "Yusuf", "Zoe", "Aidan", "Beatrix", "Chloe", "Dmitri", "Esther", "Felix", "Grace", "Hugo", "Ingrid",
         "Jonas", "Kofi", "Lucia", "Mateo", "Nora", "Oscar", "Paula", "Rafael", "Sofia", "Tomas", "Uma", "Victor")
LAST = ("Okafor", "Silva", "Nakamura", "O'Brien", "D'Angelo", "MacLeod", "Kowalski", "Haddad", "Lindqvist",
        "Mbeki", "Fernandes", "Novak", "Achebe", "Smith-Jones", "Van Dyke", "Petrova", "Rossi", "Chen", "Gupta",
        "Moreau", "Schmidt", "Jensen", "Alvarez", "Costa", "Dubois", "Ibrahim", "Kaur", "Larsen", "Mendes",
        "Nguyen", "Park", "Quigley", "Reyes", "Sato", "Turner", "Walsh", "Yilmaz", "Zhang", "McAllister",
        "de la Cruz", "St. James", "Abernathy", "Brennan", "Castillo", "Eriksen", "Fitzgerald", "O'Neill")
CITIES = ("Lisbon", "Osaka", "Cape Town", "St. Louis", "Buenos Aires", "Reykjavik", "Quebec City", "Sao Paulo",
          "Zurich", "Nairobi", "Melbourne", "Vancouver", "Edinburgh", "Krakow", "Seville", "Marrakesh", "Hanoi",
          "Lima", "Oslo", "Dublin", "Austin", "Denver", "Porto", "Accra", "Bergen", "Cork", "Genoa", "Hobart",
          "Izmir", "Jaipur", "Kyoto", "Leeds", "Malmo", "Nantes", "Ottawa", "Perth", "Quito", "Rotterdam",
          "Salzburg", "Tallinn", "Utrecht", "Valencia", "Windhoek", "Yokohama", "Zagreb", "New Orleans",
          "Santa Fe", "Fort Worth", "Port Louis", "Halifax")
ADJ = ("Silent", "Crimson", "Hidden", "Golden", "Broken", "Electric", "Last", "Wild", "Quiet", "Burning",
       "Frozen", "Lost", "Midnight", "Velvet", "Paper", "Iron", "Hollow", "Bright", "Restless", "Secret", "Little",
       "Northern", "Salty", "Lucky")
NOUN = ("River", "Garden", "Empire", "Harbor", "Signal", "Orchard", "Machine", "Lantern", "Horizon", "Kingdom",
        "Mirror", "Compass", "Storm", "Island", "Letter", "Circus", "Archive", "Engine", "Meadow", "Voyage",
        "Falcon", "Tide", "Comet", "Anchor")
VERB = ("Stop", "Wake", "Follow", "Forget", "Feed", "Chase", "Open", "Trust", "Call", "Leave", "Fear", "Sell")
TITLE_PATTERNS = ("The {adj} {noun}", "{adj} {noun}", "Don't {verb} the {noun}!", "{noun} & {noun2}",
                  "The {noun} of {city}", "{adj} {noun}: A {noun2} Story", "Who {verb}s the {noun}?",
                  "{nouns}, {nouns2} and Other {adj} Things", "Return to {city}", "{adj} {noun} (Part {n})",
                  "Mr. {last}'s {noun}", "{noun}: The Musical!", "A {noun} in {city}", "{verb} Me, {first}")
BAND_PATTERNS = ("The {adj} {nouns}", "{first} & the {nouns}", "{adj} {noun}", "{first} {last} Trio", "DJ {first}",
                 "{noun} Collective", "The {last} Sisters")
BUSINESS_PATTERNS = ("{adj} {noun} {suffix}", "{last}'s {suffix}", "The {adj} {suffix}", "{city} {suffix}",
                     "{noun} {suffix}")
NOTES = ("Delayed by fog; rebooked next day.", "Customer asked for a partial refund (approved).",
         "Needs follow-up - call back Monday!", "Paid in full, thanks!", "Reported by staff: minor damage.",
         "OK", "See e-mail from 3 May.", "VIP guest; upgrade offered.", "Second visit this year.",
         "Cancelled, then reinstated?", "Check invoice #42 & receipt.", "No issues reported.",
         "Waiting on approval (manager).", "Moved from waitlist.", "Double-checked by J. Park.", "Urgent!!")
STREETS = ("Elm", "Maple", "Harbor", "Mill", "King", "Queen", "Cedar", "Station", "Church", "Park", "Lake", "Hill",
           "Orchard", "Bridge")
STREET_TYPES = ("Street", "Avenue", "Road", "Lane", "Court", "Blvd.", "Way")
COURSE_PREFIX = ("Introduction to", "Advanced", "Topics in", "Foundations of", "Seminar: ", "Applied")
COURSE_SUBJECT = ("Data Science", "Organic Chemistry", "Medieval History", "Linear Algebra", "Microeconomics",
                  "Marine Biology", "Film Studies", "Machine Learning", "Public Policy", "Creative Writing",
                  "Astrophysics", "Urban Planning", "Ethics", "Statistics", "Music Theory")
VEHICLES = ("Toyota Corolla", "Honda Civic", "Ford Focus", "Ford F-150", "Volkswagen Golf", "Mazda CX-5",
            "Subaru Outback", "Tesla Model 3", "BMW 320i", "Kia Sportage", "Hyundai i30", "Nissan Leaf",
            "Volvo XC60", "Jeep Wrangler", "Skoda Octavia", "Audi A4", "Renault Clio", "Peugeot 208")
TEAMS = ("Riverside Rovers", "Northfield United", "Harbor City FC", "Old Town Athletic", "Eastbrook Wanderers",
         "St. Mary's Albion", "Westgate Rangers", "Kingsport Town", "Lakeside Celtic", "Millbrook Villa")
PRODUCTS = ("USB-C Cable (2 m)", "Espresso Beans 1kg", "Yoga Mat", "LED Desk Lamp", "Wireless Mouse",
            "Rain Jacket (XL)", "Cast-Iron Pan", "Noise-Cancelling Headphones", "Board Game: Castles!",
            "Water Bottle", "Running Shoes", "Phone Case")

# ------------------------------------------------------------------------------------- domains


@dataclass(frozen=True)
class Col:
    """A column of a domain: its natural header, its kind and the kind's argument
    (a word pool, an id pattern, a text generator, a year range or a numeric range)."""

    label: str
    kind: str
    arg: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Domain:
    """A table theme. `cols[0]` is the key: unique within a table, used to name rows."""

    name: str
    tables: tuple[str, ...]
    entity: str
    entities: str
    cols: tuple[Col, ...]


def _c(label: str, kind: str, *arg: Any) -> Col:
    return Col(label, kind, arg)


_DOMAIN_SPECS: tuple[Domain, ...] = (
    Domain("library loans", ("Library Loans", "library_loans", "Loans (Central Library)"), "loan", "loans", (
        _c("Loan ID", "id", "LN-{:04d}"), _c("Book Title", "text", "title"), _c("Borrower", "name"),
        _c("Branch", "category", "Central", "Eastside", "Riverside", "Old Town", "Harbor View", "North Hill"),
        _c("Loan Date", "date", 2016, 2023), _c("Days Overdue", "count", 0, 45),
        _c("Late Fee (USD)", "money", 0, 30), _c("Notes", "text", "note"))),
    Domain("hospital visits", ("Hospital Visits", "hospital_visits", "ER Admissions (2021)"), "visit", "visits", (
        _c("Visit ID", "id", "V{:05d}"), _c("Patient", "name"),
        _c("Department", "category", "Cardiology", "Oncology", "Pediatrics", "Orthopedics", "Neurology",
           "Emergency", "Dermatology"),
        _c("Attending Physician", "name"), _c("Admission Date", "date", 2018, 2023),
        _c("Length of Stay (days)", "count", 1, 21), _c("Bill Amount", "money", 120, 9500))),
    Domain("flights", ("Flight Schedule", "flights", "Departures (Terminal 2)"), "flight", "flights", (
        _c("Flight No.", "id", "QX {:d}"), _c("Origin", "place"), _c("Destination", "place"),
        _c("Airline", "category", "SkyWays", "Aero Nord", "Pacific Jet", "BlueLine Air", "Coastal Express"),
        _c("Departure Date", "date", 2019, 2024), _c("Passengers", "count", 40, 380),
        _c("Delay (min)", "count", 0, 240), _c("Load Factor (%)", "percent", 35, 100))),
    Domain("football results", ("Football Results", "match_results", "League Fixtures (Season 2019-20)"), "match",
           "matches", (
        _c("Match No.", "id", "M{:03d}"), _c("Home Team", "category", *TEAMS), _c("Away Team", "category", *TEAMS),
        _c("Score", "text", "score"),
        _c("Stadium", "category", "Victoria Park", "The Old Mill", "Riverside Ground", "Kings Road", "Harbor Arena"),
        _c("Attendance", "count", 2500, 82000), _c("Match Date", "date", 2015, 2022), _c("Referee", "name"))),
    Domain("restaurants", ("Restaurant Guide", "restaurants", "Best Restaurants (City Edition)"), "restaurant",
           "restaurants", (
        _c("Restaurant", "text", "business", "Bistro", "Kitchen", "Grill", "Cafe", "Trattoria", "Diner"),
        _c("Cuisine", "category", "Italian", "Japanese", "Mexican", "Ethiopian", "French", "Thai", "Lebanese"),
        _c("City", "place"), _c("Head Chef", "name"), _c("Rating", "rating", 1, 5),
        _c("Average Bill (EUR)", "money", 12, 140), _c("Seats", "count", 18, 220), _c("Opened", "year", 1975, 2023))),
    Domain("real-estate listings", ("Real Estate Listings", "property_listings", "Homes for Sale (Spring)"),
           "listing", "listings", (
        _c("Listing ID", "id", "RE-{:05d}"), _c("Address", "text", "address"),
        _c("Neighborhood", "category", "Old Town", "Riverside", "Hillcrest", "Docklands", "Green Park", "Uptown"),
        _c("Bedrooms", "count", 1, 6), _c("Floor Area (sq ft)", "count", 450, 5200),
        _c("Asking Price", "money", 85000, 2400000, 100000), _c("Listed On", "date", 2019, 2024), _c("Agent", "name"))),
    Domain("film releases", ("Film Releases", "film_releases", "Box Office (Summer Releases)"), "film", "films", (
        _c("Title", "text", "title"), _c("Director", "name"),
        _c("Genre", "category", "Drama", "Comedy", "Thriller", "Sci-Fi", "Documentary", "Animation", "Horror"),
        _c("Release Date", "date", 1990, 2023), _c("Runtime (min)", "count", 78, 195),
        _c("Box Office (USD millions)", "money", 1, 950), _c("IMDb Rating", "rating", 3, 9))),
    Domain("employees", ("Employee Directory", "employees", "Staff (Head Office)"), "employee", "employees", (
        _c("Employee ID", "id", "E{:04d}"), _c("Full Name", "name"),
        _c("Department", "category", "Finance", "Marketing", "Engineering", "Legal", "Sales", "HR", "Support"),
        _c("Office", "place"), _c("Hire Date", "date", 2005, 2024),
        _c("Salary", "money", 32000, 185000, 50000), _c("Age", "count", 21, 64), _c("Bonus (%)", "percent", 0, 25))),
    Domain("weather stations", ("Weather Stations", "weather_readings", "Station Readings (January)"), "station",
           "stations", (
        _c("Station", "text", "business", "Ridge", "Point", "Station", "Observatory", "Field", "Summit"),
        _c("Region", "category", "Coastal", "Highlands", "Valley", "Plains", "Islands", "Desert"),
        _c("Elevation (m)", "count", 0, 3200), _c("Reading Date", "date", 2020, 2023),
        _c("Max Temp (C)", "measure", -15, 42), _c("Rainfall (mm)", "measure", 0, 120),
        _c("Humidity (%)", "percent", 10, 100))),
    Domain("retail orders", ("Online Orders", "retail_orders", "Orders (Q3 2022)"), "order", "orders", (
        _c("Order ID", "id", "ORD-{:06d}"), _c("Customer", "name"), _c("Product", "category", *PRODUCTS),
        _c("Payment Method", "category", "Credit Card", "PayPal", "Gift Card", "Bank Transfer", "Cash on Delivery"),
        _c("Quantity", "count", 1, 24), _c("Unit Price", "money", 2, 650), _c("Order Date", "date", 2021, 2023),
        _c("Ship City", "place"))),
    Domain("university courses", ("University Courses", "courses", "Course Catalog (Fall Term)"), "course", "courses", (
        _c("Course Code", "id", "CRS {:d}"), _c("Course Title", "text", "course"),
        _c("Department", "category", "Physics", "History", "Biology", "Economics", "Computer Science", "Arts"),
        _c("Instructor", "name"), _c("Credits", "count", 1, 6), _c("Enrolled", "count", 6, 320),
        _c("Semester", "category", "Fall 2021", "Spring 2022", "Fall 2022", "Spring 2023", "Summer 2023"),
        _c("Pass Rate (%)", "percent", 40, 100))),
    Domain("museum exhibits", ("Museum Exhibits", "exhibits", "Exhibitions (East Wing)"), "exhibit", "exhibits", (
        _c("Exhibit", "text", "title"), _c("Curator", "name"),
        _c("Gallery", "category", "East Wing", "West Wing", "Atrium", "Lower Gallery", "Sculpture Court"),
        _c("Opening Date", "date", 2008, 2024), _c("Visitors", "count", 800, 250000),
        _c("Ticket Price", "money", 0, 35), _c("Artifacts", "count", 5, 420))),
    Domain("bike rentals", ("Bike Rentals", "bike_rentals", "Rentals (Downtown Docks)"), "rental", "rentals", (
        _c("Rental ID", "id", "BR{:06d}"), _c("Rider", "name"),
        _c("Start Station", "category", "Central Square", "Pier 4", "Museum Mile", "Union Yard", "Park Gate"),
        _c("End Station", "category", "Central Square", "Pier 4", "Museum Mile", "Union Yard", "Park Gate"),
        _c("Rental Date", "date", 2021, 2024), _c("Duration (min)", "count", 3, 180),
        _c("Distance (km)", "measure", 0, 42), _c("Fare", "money", 1, 25))),
    Domain("concerts", ("Concert Listings", "concerts", "Tour Dates (2023)"), "concert", "concerts", (
        _c("Artist", "text", "band"),
        _c("Venue", "category", "The Roundhouse", "Blue Note Hall", "Arena North", "Riverside Amphitheatre",
           "Club 9"),
        _c("City", "place"), _c("Concert Date", "date", 2018, 2024), _c("Tickets Sold", "count", 150, 60000),
        _c("Ticket Price (USD)", "money", 15, 250),
        _c("Genre", "category", "Rock", "Jazz", "Hip-Hop", "Folk", "Electronic", "Classical"))),
    Domain("car sales", ("Car Sales", "car_sales", "Dealership Sales (Used Cars)"), "sale", "sales", (
        _c("Sale ID", "id", "CS-{:05d}"), _c("Vehicle", "category", *VEHICLES),
        _c("Body Style", "category", "Sedan", "SUV", "Hatchback", "Pickup", "Coupe", "Wagon"),
        _c("Model Year", "year", 2008, 2023), _c("Mileage (km)", "count", 1200, 240000),
        _c("Price", "money", 3500, 78000, 5000), _c("Salesperson", "name"), _c("Sale Date", "date", 2020, 2024))),
    Domain("hotels", ("Hotel Directory", "hotels", "Hotels (Coastal Region)"), "hotel", "hotels", (
        _c("Hotel", "text", "business", "Hotel", "Inn", "Lodge", "Suites", "Resort"), _c("City", "place"),
        _c("Stars", "count", 1, 5), _c("Rooms", "count", 12, 640), _c("Nightly Rate", "money", 45, 720),
        _c("Occupancy (%)", "percent", 30, 99), _c("Manager", "name"), _c("Opened", "year", 1890, 2022))),
    Domain("clinical trials", ("Clinical Trials", "clinical_trials", "Registered Trials (Phase II-III)"), "trial",
           "trials", (
        _c("Trial ID", "id", "NCT0{:07d}"),
        _c("Condition", "category", "Asthma", "Type 2 Diabetes", "Migraine", "Hypertension", "Psoriasis", "Long COVID"),
        _c("Phase", "category", "Phase I", "Phase II", "Phase III", "Phase IV"),
        _c("Sponsor", "category", "Helix Pharma", "Northwind Bio", "Acme Therapeutics", "Meridian Labs"),
        _c("Participants", "count", 12, 4800), _c("Start Date", "date", 2012, 2024),
        _c("Principal Investigator", "name"), _c("Response Rate (%)", "percent", 5, 85))),
    Domain("space launches", ("Space Launches", "launch_log", "Orbital Launches (2010s)"), "mission", "missions", (
        _c("Mission", "text", "mission"),
        _c("Rocket", "category", "Falcon 9", "Atlas V", "Ariane 5", "Electron", "Soyuz-2", "PSLV"),
        _c("Launch Site", "category", "Cape Canaveral", "Kourou", "Baikonur", "Mahia Peninsula", "Sriharikota"),
        _c("Launch Date", "date", 2010, 2023), _c("Payload (kg)", "count", 50, 22000),
        _c("Outcome", "category", "Success", "Partial failure", "Failure"),
        _c("Cost (USD millions)", "money", 7, 450))),
    Domain("farm harvests", ("Harvest Records", "farm_harvest", "Farm Yields (2022 Season)"), "farm", "farms", (
        _c("Farm", "text", "business", "Farm", "Acres", "Orchards", "Ranch", "Homestead"),
        _c("Crop", "category", "Wheat", "Barley", "Apples", "Soybeans", "Potatoes", "Canola", "Grapes"),
        _c("County", "category", "Marlow", "Ashby", "Fenwick", "Dunmore", "Kessling"),
        _c("Harvest Year", "year", 2015, 2023), _c("Yield (tonnes)", "measure", 1, 950),
        _c("Area (ha)", "count", 3, 1800), _c("Owner", "name"))),
    Domain("podcasts", ("Podcast Episodes", "podcast_episodes", "Top Episodes (This Year)"), "episode", "episodes", (
        _c("Episode", "text", "title"),
        _c("Podcast", "category", "Deep Dive Daily", "The Curious Hour", "Numbers Game", "Off the Record",
           "Night Shift Radio"),
        _c("Host", "name"), _c("Release Date", "date", 2017, 2024), _c("Duration (min)", "count", 8, 185),
        _c("Downloads", "count", 300, 2500000), _c("Rating", "rating", 1, 5))),
    Domain("marathon results", ("Marathon Results", "marathon_results", "City Marathon (Finishers)"), "runner",
           "runners", (
        _c("Bib", "id", "B{:04d}"), _c("Runner", "name"),
        _c("Country", "category", "Kenya", "Ethiopia", "Japan", "Norway", "Brazil", "Canada", "Morocco"),
        _c("Age", "count", 18, 78),
        _c("Finish Time (min)", "measure", 125, 390), _c("Race Date", "date", 2014, 2023),
        _c("Club", "category", "Harriers AC", "City Striders", "Trail Foxes", "Unattached"))),
    Domain("schools", ("School Directory", "schools", "Public Schools (District Report)"), "school", "schools", (
        _c("School", "text", "business", "Elementary School", "High School", "Academy", "Middle School"),
        _c("District", "category", "North", "South", "East", "West", "Central"), _c("Principal", "name"),
        _c("Students", "count", 120, 3200), _c("Teachers", "count", 8, 210), _c("Founded", "year", 1850, 2015),
        _c("Graduation Rate (%)", "percent", 55, 100))),
    Domain("video games", ("Video Game Releases", "video_games", "Game Sales (All Platforms)"), "game", "games", (
        _c("Title", "text", "title"),
        _c("Studio", "category", "Pixel Forge", "Moonlit Games", "Red Kite Studios", "Hexagon Interactive"),
        _c("Platform", "category", "PC", "PlayStation 5", "Xbox Series X", "Nintendo Switch", "Mobile"),
        _c("Release Date", "date", 2010, 2024), _c("Copies Sold (millions)", "measure", 0, 45),
        _c("Metascore", "count", 35, 98), _c("Price", "money", 0, 70))),
    Domain("train services", ("Train Services", "train_services", "Rail Timetable (Weekday)"), "service", "services", (
        _c("Service", "id", "IC {:d}"), _c("From", "place"), _c("To", "place"),
        _c("Operator", "category", "Northern Rail", "Coastline", "Express Link", "Valley Lines"),
        _c("Distance (km)", "count", 20, 1400), _c("Journey Time (min)", "count", 15, 720),
        _c("Fare (GBP)", "money", 4, 320), _c("First Run", "date", 1995, 2023))),
    Domain("art auctions", ("Art Auction Results", "auction_lots", "Auction Sales (Evening Sale)"), "lot", "lots", (
        _c("Lot", "id", "Lot {:d}"), _c("Artwork", "text", "title"), _c("Artist", "name"),
        _c("Auction House", "category", "Harrow & Finch", "Beaumont's", "Gallery Nine", "Old Quay Auctions"),
        _c("Sale Date", "date", 2005, 2024), _c("Hammer Price (USD)", "money", 1500, 4500000, 10000),
        _c("Year Created", "year", 1850, 2020))),
)
DOMAINS: tuple[str, ...] = tuple(d.name for d in _DOMAIN_SPECS)

INT_KINDS = ("count", "year")
DEC_KINDS = ("money", "percent", "rating", "measure")
NUM_KINDS = INT_KINDS + DEC_KINDS
FILTER_KINDS = ("category", "place")  # few distinct values per table, so they repeat
QUOTED_KINDS = ("text",)  # shown in "double quotes" in questions: titles carry punctuation
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
DATE_FORMATS = ("long", "dmy", "iso", "abbr")

# ------------------------------------------------------------------------------------- tables


@dataclass
class Table:
    """One generated table: headers as written in the task, rows of TEXT cells."""

    domain: Domain
    name: str
    headers: list[str]
    pools: dict[int, tuple[str, ...]]  # per-table subsets of category/place pools
    date_format: dict[int, str]
    next_id: list[int]  # [counter, step] for the id key
    rows: list[list[str]] = field(default_factory=list)

    def kind(self, c: int) -> str:
        return self.domain.cols[c].kind

    def label(self, c: int) -> str:
        return self.domain.cols[c].label

    def cols(self, *kinds: str, skip: Sequence[int] = ()) -> list[int]:
        return [i for i, col in enumerate(self.domain.cols) if col.kind in kinds and i not in skip]

    def all_rows(self) -> list[int]:
        return list(range(len(self.rows)))

    def spec(self) -> TableSpec:
        return TableSpec(self.name, tuple(self.headers), tuple(map(tuple, self.rows)))

    def keys(self) -> set[str]:
        return {row[0].casefold() for row in self.rows}


def _snake(label: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", label).strip("_").lower()


def _make_table(rng: random.Random, domain: Domain) -> Table:
    snake = rng.random() < 0.35  # some tables use snake_case headers, the rest natural ones
    headers = [_snake(c.label) if snake else c.label for c in domain.cols]
    pools = {}
    for i, col in enumerate(domain.cols):
        if col.kind in FILTER_KINDS:
            pool = col.arg or CITIES
            pools[i] = tuple(rng.sample(pool, min(len(pool), rng.randint(3, 6))))
    formats = {i: rng.choice(DATE_FORMATS) for i, col in enumerate(domain.cols) if col.kind == "date"}
    table = Table(domain, rng.choice(domain.tables), headers, pools, formats, [rng.randint(1, 900), rng.randint(1, 9)])
    for _ in range(rng.randint(8, 40)):
        table.rows.append(_new_row(rng, table))
    return table


def _new_row(rng: random.Random, t: Table) -> list[str]:
    return [_fresh_key(rng, t)] + [_value(rng, t, c) for c in range(1, len(t.headers))]


def _fresh_key(rng: random.Random, t: Table) -> str:
    """A key value no row has yet (compared case-insensitively, as both engines do)."""
    col = t.domain.cols[0]
    if col.kind == "id":
        t.next_id[0] += t.next_id[1]
        return col.arg[0].format(t.next_id[0])
    taken = t.keys()
    for attempt in range(100):
        value = _value(rng, t, 0)
        if attempt >= 50:  # the word lists ran short: number it
            value = f"{value} {attempt}"
        if value.casefold() not in taken:
            return value
    raise RuntimeError(f"cannot draw a fresh key for {t.domain.name}")


def _value(rng: random.Random, t: Table, c: int) -> str:
    col = t.domain.cols[c]
    kind, arg = col.kind, col.arg
    if kind in FILTER_KINDS:
        return rng.choice(t.pools[c])
    if kind == "name":
        return _person(rng)
    if kind == "text":
        return TEXT_GENERATORS[arg[0]](rng, arg[1:])
    if kind == "date":
        return _date(rng, arg[0], arg[1], t.date_format[c])
    if kind in INT_KINDS:
        return str(rng.randint(arg[0], arg[1]))
    if kind == "money":
        step = arg[2] if len(arg) > 2 else 1
        return _fixed(rng.randrange(arg[0] * 100, arg[1] * 100 + 1, step), 2)
    if kind in ("percent", "rating", "measure"):
        return _fixed(rng.randint(arg[0] * 10, arg[1] * 10), 1)
    raise ValueError(f"unknown column kind {kind!r}")


def _fixed(units: int, places: int) -> str:
    """`units` hundredths (places=2) or tenths (places=1) as exact decimal text, e.g. -35 -> '-3.5'."""
    sign, units = ("-" if units < 0 else ""), abs(units)
    scale = 10 ** places
    return f"{sign}{units // scale}.{units % scale:0{places}d}"


def _person(rng: random.Random) -> str:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    if rng.random() < 0.15:
        return f"{first} {rng.choice('ABCDEFGHJKLMNPRSTW')}. {last}"
    return f"{first} {last}"


def _date(rng: random.Random, lo: int, hi: int, fmt: str) -> str:
    day = dt.date.fromordinal(rng.randint(dt.date(lo, 1, 1).toordinal(), dt.date(hi, 12, 31).toordinal()))
    if fmt == "iso":
        return day.isoformat()
    if fmt == "dmy":
        return f"{day.day} {MONTHS[day.month - 1]} {day.year}"
    if fmt == "abbr":
        return f"{MONTHS[day.month - 1][:3]} {day.day}, {day.year}"
    return f"{MONTHS[day.month - 1]} {day.day}, {day.year}"


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _words(rng: random.Random) -> dict[str, Any]:
    noun, noun2 = rng.choice(NOUN), rng.choice(NOUN)
    return dict(adj=rng.choice(ADJ), noun=noun, noun2=noun2, nouns=_plural(noun), nouns2=_plural(noun2),
                verb=rng.choice(VERB), city=rng.choice(CITIES), first=rng.choice(FIRST), last=rng.choice(LAST),
                n=rng.randint(2, 4))


TEXT_GENERATORS: dict[str, Callable[[random.Random, tuple[Any, ...]], str]] = {
    "title": lambda rng, _: rng.choice(TITLE_PATTERNS).format(**_words(rng)),
    "band": lambda rng, _: rng.choice(BAND_PATTERNS).format(**_words(rng)),
    "business": lambda rng, suffixes: rng.choice(BUSINESS_PATTERNS).format(suffix=rng.choice(suffixes), **_words(rng)),
    "note": lambda rng, _: rng.choice(NOTES),
    "score": lambda rng, _: f"{rng.randint(0, 5)}-{rng.randint(0, 5)}",
    "address": lambda rng, _: f"{rng.randint(1, 240)} {rng.choice(STREETS)} {rng.choice(STREET_TYPES)}",
    "course": lambda rng, _: f"{rng.choice(COURSE_PREFIX)} {rng.choice(COURSE_SUBJECT)}".replace(":  ", ": "),
    "mission": lambda rng, _: f"{rng.choice(NOUN)}-{rng.randint(1, 30)}",
}

# ------------------------------------------------------------------------------------- SQL and text helpers

OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt, "<": operator.lt, ">=": operator.ge, "<=": operator.le,
}
OP_WORDS = {
    ">": ("greater than", "more than", "above", "over"),
    "<": ("less than", "below", "under", "lower than"),
    ">=": ("at least", "no less than", "greater than or equal to"),
    "<=": ("at most", "no more than", "less than or equal to"),
}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
ROUNDING = (" Round the answer to 2 decimal places.", " (rounded to two decimal places)")


def q(name: str) -> str:
    """A MySQL identifier: always backticked, as upstream does for names with spaces."""
    return f"`{name}`"


def lit(value: str) -> str:
    """A MySQL string literal. Doubled quotes work in MySQL, SQLite and sqlglot alike."""
    return "'" + value.replace("'", "''") + "'"


@functools.lru_cache(maxsize=1 << 16)
def num(value: str) -> Fraction:
    """A cell's exact value (cached: parsing a Fraction from text is slow, and cells repeat)."""
    return Fraction(value)


def cast(t: Table, c: int) -> str:
    """Numeric view of a TEXT column: SIGNED for integers, DOUBLE for decimals (never DECIMAL: MySQL
    would return Decimal objects whose repr is not a plain literal)."""
    return f"CAST({q(t.headers[c])} AS {'SIGNED' if t.kind(c) in INT_KINDS else 'DOUBLE'})"


def show(t: Table, c: int, value: str) -> str:
    return f'"{value}"' if t.kind(c) in QUOTED_KINDS else value


class Cond(NamedTuple):
    """One WHERE condition: `column = 'text'` or `column <op> number`."""

    col: int
    op: str
    value: str

    def sql(self, t: Table) -> str:
        if self.op == "=":
            return f"{q(t.headers[self.col])} = {lit(self.value)}"
        return f"{q(t.headers[self.col])} {self.op} {self.value}"

    def text(self, rng: random.Random, t: Table) -> str:
        """As a clause: "Branch is Central", "Seats is more than 40" (after "whose" or "where the")."""
        return self.words(rng, t)[0]

    def words(self, rng: random.Random, t: Table) -> tuple[str, str]:
        """(clause, noun phrase): the noun phrase follows "with a": "Branch of Central", "Seats above 40"."""
        label, value = t.label(self.col), show(t, self.col, self.value)
        if self.op == "=":
            return f"{label} is {value}", f"{label} of {value}"
        word = rng.choice(OP_WORDS[self.op])
        return f"{label} is {word} {value}", f"{label} {word} {value}"

    def holds(self, t: Table, r: int) -> bool:
        cell = t.rows[r][self.col]
        if self.op == "=":
            return cell.casefold() == self.value.casefold()
        return OPS[self.op](num(cell), num(self.value))


def where(t: Table, conds: Sequence[Cond]) -> str:
    return (" WHERE " + " AND ".join(c.sql(t) for c in conds)) if conds else ""


def matching(t: Table, conds: Sequence[Cond], rows: Sequence[int] | None = None) -> list[int]:
    return [r for r in (t.all_rows() if rows is None else rows) if all(c.holds(t, r) for c in conds)]


def pick_eq(rng: random.Random, t: Table, lo: int, hi: int, rows: Sequence[int] | None = None) -> Cond | None:
    """`filter column = value` matching between lo and hi rows."""
    rows = t.all_rows() if rows is None else rows
    cols = t.cols(*FILTER_KINDS)
    for c in rng.sample(cols, len(cols)):
        counts = Counter(t.rows[r][c] for r in rows)
        good = sorted(v for v, k in counts.items() if lo <= k <= hi)
        if good:
            return Cond(c, "=", rng.choice(good))
    return None


def pick_threshold(rng: random.Random, t: Table, c: int, lo: int, hi: int, rows: Sequence[int] | None = None,
                   ops: Sequence[str] = tuple(OPS)) -> Cond | None:
    """`c <op> number` matching between lo and hi rows. Numbers are never negative: the backend only casts a
    column compared with a plain literal, and `-3` parses as a negation."""
    rows = t.all_rows() if rows is None else rows
    values = sorted({num(t.rows[r][c]) for r in rows})
    candidates = sorted({v for v in values if v >= 0} | {Fraction(int(v) // 10 * 10) for v in values if v >= 0})
    for _ in range(8):
        if not candidates:
            return None
        x, op = rng.choice(candidates), rng.choice(ops)
        text = _fixed(int(x * 100), 2).rstrip("0").rstrip(".") if x.denominator != 1 else str(x)
        cond = Cond(c, op, text)
        if lo <= len(matching(t, [cond], rows)) <= hi:
            return cond
    return None


class Draft(NamedTuple):
    template: str
    phrasing: int
    description: str
    sql: str


def phrase(rng: random.Random, template: str, options: Sequence[str], sql: str, **fields: Any) -> Draft:
    i = rng.randrange(len(options))
    text = re.sub(r"\.\.(?=\s|$)", ".", options[i].format(**fields))  # a label ending in "." ends a sentence
    return Draft(template, i, text[0].upper() + text[1:], sql)


def cond_fields(rng: random.Random, t: Table, cond: Cond) -> dict[str, str]:
    clause, noun_phrase = cond.words(rng, t)
    return dict(cond=clause, np=noun_phrase)


def base_fields(t: Table) -> dict[str, str]:
    d = t.domain
    return dict(ent=d.entity, ents=d.entities, key=t.label(0), table=t.name)


def select(t: Table, what: str, conds: Sequence[Cond] = (), tail: str = "") -> str:
    return f"SELECT {what} FROM {q(t.name)}{where(t, conds)}{tail};"


# ------------------------------------------------------------------------------------- SELECT templates
# Each returns a Draft, or None when this table cannot host it (another template or table is tried).


def other_lookup(rng: random.Random, t: Table) -> Draft | None:
    r, c = rng.randrange(len(t.rows)), rng.randrange(1, len(t.headers))
    kv = t.rows[r][0]
    return phrase(rng, "other.lookup", (
        "What is the {col} of the {ent} with {key} {kv}?",
        "What {col} is listed for {key} {kv}?",
        "For the {ent} whose {key} is {kv}, what is the {col}?",
        "Tell me the {col} when the {key} is {kv}.",
    ), select(t, q(t.headers[c]), [Cond(0, "=", kv)]), col=t.label(c), kv=show(t, 0, kv), **base_fields(t))


def other_reverse(rng: random.Random, t: Table) -> Draft | None:
    c = rng.randrange(1, len(t.headers))
    counts = Counter(row[c].casefold() for row in t.rows)
    unique = [row[c] for row in t.rows if counts[row[c].casefold()] == 1]
    if not unique:
        return None
    v = rng.choice(unique)
    return phrase(rng, "other.reverse", (
        "Which {key} has a {col} of {v}?",
        "What is the {key} of the {ent} whose {col} is {v}?",
        "Name the {key} for the {ent} with {col} {v}.",
    ), select(t, q(t.headers[0]), [Cond(c, "=", v)]), col=t.label(c), v=show(t, c, v), **base_fields(t))


def other_list(rng: random.Random, t: Table) -> Draft | None:
    cond = pick_eq(rng, t, 2, MAX_VALUES)
    if cond is None:
        return None
    return phrase(rng, "other.list", (
        "List the {key} of every {ent} whose {cond}.",
        "Which {ents} have {col} {v}? Give their {key}.",
        "Give all {key} values where the {cond}.",
    ), select(t, q(t.headers[0]), [cond]), cond=cond.text(rng, t), col=t.label(cond.col), v=cond.value,
        **base_fields(t))


def other_two_conditions(rng: random.Random, t: Table) -> Draft | None:
    first = pick_eq(rng, t, 2, len(t.rows))
    if first is None:
        return None
    rows = matching(t, [first])
    c2 = rng.choice([c for c in range(1, len(t.headers)) if c != first.col])
    second = Cond(c2, "=", t.rows[rng.choice(rows)][c2])
    out = rng.choice([c for c in range(len(t.headers)) if c not in (first.col, c2)])
    return phrase(rng, "other.two_conditions", (
        "What is the {out} when the {c1} is {v1} and the {c2} is {v2}?",
        "Which {out} has a {c1} of {v1} and a {c2} of {v2}?",
        "Find the {out} for the {ent} with {c1} {v1} and {c2} {v2}.",
    ), select(t, q(t.headers[out]), [first, second]), out=t.label(out), c1=t.label(first.col),
        v1=show(t, first.col, first.value), c2=t.label(c2), v2=show(t, c2, second.value), **base_fields(t))


def other_like(rng: random.Random, t: Table) -> Draft | None:
    cols = t.cols("text")
    if not cols:
        return None
    c = rng.choice(cols)
    words = sorted({w for row in t.rows for w in re.findall(r"[A-Za-z]{4,}", row[c])})
    if not words:
        return None
    word = rng.choice(words)
    hits = [r for r in t.all_rows() if word.casefold() in t.rows[r][c].casefold()]
    if not 1 <= len(hits) <= MAX_VALUES:
        return None
    sql = f"SELECT {q(t.headers[0])} FROM {q(t.name)} WHERE {q(t.headers[c])} LIKE {lit('%' + word + '%')};"
    return phrase(rng, "other.like", (
        "Which {ents} have a {col} containing the word \"{w}\"? Give their {key}.",
        "Find every {key} whose {col} mentions \"{w}\".",
        "List the {key} where the {col} includes '{w}'.",
    ), sql, col=t.label(c), w=word, **base_fields(t))


def counting_eq(rng: random.Random, t: Table) -> Draft | None:
    cond = pick_eq(rng, t, 1, len(t.rows))
    if cond is None:
        return None
    what = rng.choice(("COUNT(*)", f"COUNT({q(t.headers[0])})"))
    return phrase(rng, "counting.eq", (
        "How many {ents} have {col} {v}?",
        "What is the number of {ents} whose {cond}?",
        "Count the {ents} with a {col} of {v}.",
        "How many rows list {v} as the {col}?",
    ), select(t, what, [cond]), col=t.label(cond.col), v=cond.value, cond=cond.text(rng, t), **base_fields(t))


def counting_threshold(rng: random.Random, t: Table) -> Draft | None:
    cond = pick_threshold(rng, t, rng.choice(t.cols(*NUM_KINDS)), 1, len(t.rows))
    if cond is None:
        return None
    return phrase(rng, "counting.threshold", (
        "How many {ents} have a {np}?",
        "Count the {ents} whose {cond}.",
        "What is the total number of {ents} where the {cond}?",
    ), select(t, "COUNT(*)", [cond]), **cond_fields(rng, t, cond), **base_fields(t))


def counting_distinct(rng: random.Random, t: Table) -> Draft | None:
    c = rng.choice(t.cols(*FILTER_KINDS))
    return phrase(rng, "counting.distinct", (
        "How many different {col} values are there?",
        "How many distinct {col} entries appear in the {table} table?",
        "Count the unique values of {col}.",
    ), select(t, f"COUNT(DISTINCT {q(t.headers[c])})"), col=t.label(c), **base_fields(t))


def counting_two_conditions(rng: random.Random, t: Table) -> Draft | None:
    first = pick_eq(rng, t, 2, len(t.rows))
    if first is None:
        return None
    second = pick_threshold(rng, t, rng.choice(t.cols(*NUM_KINDS)), 1, len(t.rows), matching(t, [first]))
    if second is None:
        return None
    return phrase(rng, "counting.two_conditions", (
        "How many {ents} with {c1} {v1} have a {np}?",
        "Among the {ents} whose {cond1}, how many have a {np}?",
        "Count the rows where the {cond1} and the {cond}.",
    ), select(t, "COUNT(*)", [first, second]), c1=t.label(first.col), v1=first.value, cond1=first.text(rng, t),
        **cond_fields(rng, t, second), **base_fields(t))


def comparison_threshold(rng: random.Random, t: Table) -> Draft | None:
    cond = pick_threshold(rng, t, rng.choice(t.cols(*NUM_KINDS)), 1, MAX_VALUES)
    if cond is None:
        return None
    return phrase(rng, "comparison.threshold", (
        "Which {ents} have a {np}? Give their {key}.",
        "List the {key} of {ents} whose {cond}.",
        "Name every {key} where the {cond}.",
    ), select(t, q(t.headers[0]), [cond]), **cond_fields(rng, t, cond), **base_fields(t))


def comparison_with_filter(rng: random.Random, t: Table) -> Draft | None:
    first = pick_eq(rng, t, 2, len(t.rows))
    if first is None:
        return None
    second = pick_threshold(rng, t, rng.choice(t.cols(*NUM_KINDS)), 1, MAX_VALUES, matching(t, [first]))
    if second is None:
        return None
    return phrase(rng, "comparison.with_filter", (
        "Which {key} has a {c1} of {v1} and a {np}?",
        "Among {ents} whose {cond1}, which ones have a {np}? Give the {key}.",
        "List the {key} where the {cond1} and the {cond}.",
    ), select(t, q(t.headers[0]), [first, second]), c1=t.label(first.col), v1=first.value,
        cond1=first.text(rng, t), **cond_fields(rng, t, second), **base_fields(t))


def comparison_range(rng: random.Random, t: Table) -> Draft | None:
    # `a < col AND col < b`, never BETWEEN: the SQLite backend does not cast BETWEEN operands.
    c = rng.choice(t.cols(*NUM_KINDS))
    low = pick_threshold(rng, t, c, 1, len(t.rows), ops=(">",))
    if low is None:
        return None
    high = pick_threshold(rng, t, c, 1, MAX_VALUES, matching(t, [low]), ops=("<",))
    if high is None or num(high.value) <= num(low.value):
        return None
    return phrase(rng, "comparison.range", (
        "Which {ents} have a {col} strictly between {a} and {b}? Give their {key}.",
        "List the {key} of every {ent} with {col} greater than {a} but less than {b}.",
        "Name the {key} whose {col} is above {a} and below {b}.",
    ), select(t, q(t.headers[0]), [low, high]), col=t.label(c), a=low.value, b=high.value, **base_fields(t))


def comparison_other_column(rng: random.Random, t: Table) -> Draft | None:
    c = rng.choice(t.cols(*NUM_KINDS))
    cond = pick_threshold(rng, t, c, 1, MAX_VALUES)
    if cond is None:
        return None
    out = rng.choice([i for i in range(1, len(t.headers)) if i != c])
    return phrase(rng, "comparison.other_column", (
        "What is the {out} of the {ents} whose {cond}?",
        "Give the {out} for every {ent} with a {np}.",
        "Which {out} values belong to {ents} where the {cond}?",
    ), select(t, q(t.headers[out]), [cond]), out=t.label(out), **cond_fields(rng, t, cond), **base_fields(t))


SUPERLATIVE = {"DESC": ("highest", "largest", "greatest"), "ASC": ("lowest", "smallest", "least")}


def _ranked(t: Table, c: int, rows: Sequence[int], order: str) -> list[tuple[Fraction, int]]:
    return sorted(((num(t.rows[r][c]), r) for r in rows), reverse=order == "DESC")


def _tie_free(ranked: list[tuple[Fraction, int]], k: int) -> bool:
    """True when the first k positions are decided: no tie inside them or across the cut."""
    values = [v for v, _ in ranked]
    if len(values) <= k:
        return False
    return all(values[i] != values[i + 1] for i in range(k))


def ranking_top(rng: random.Random, t: Table) -> Draft | None:
    c, order = rng.choice(t.cols(*NUM_KINDS)), rng.choice(("DESC", "ASC"))
    if not _tie_free(_ranked(t, c, t.all_rows(), order), 1):
        return None
    sql = select(t, q(t.headers[0]), tail=f" ORDER BY {cast(t, c)} {order} LIMIT 1")
    return phrase(rng, "ranking.top", (
        "Which {key} has the {sup} {col}?",
        "What is the {key} of the {ent} with the {sup} {col}?",
        "Name the {ent} with the {sup} {col}.",
        "Which {ent} ranks first by {col} ({dir} order)?",
    ), sql, col=t.label(c), sup=rng.choice(SUPERLATIVE[order]), dir="descending" if order == "DESC" else "ascending",
        **base_fields(t))


def ranking_top_k(rng: random.Random, t: Table) -> Draft | None:
    c, order, k = rng.choice(t.cols(*NUM_KINDS)), rng.choice(("DESC", "ASC")), rng.choice((2, 3))
    if not _tie_free(_ranked(t, c, t.all_rows(), order), k):
        return None
    sql = select(t, q(t.headers[0]), tail=f" ORDER BY {cast(t, c)} {order} LIMIT {k}")
    return phrase(rng, "ranking.top_k", (
        "List the {k} {ents} with the {sup} {col}.",
        "Which {k} {key} values have the {sup} {col}?",
        "Give the {key} of the top {k} {ents} by {col}, {sup} first.",
    ), sql, k=NUMBER_WORDS[k], col=t.label(c), sup=rng.choice(SUPERLATIVE[order]), **base_fields(t))


def ranking_second(rng: random.Random, t: Table) -> Draft | None:
    c, order = rng.choice(t.cols(*NUM_KINDS)), rng.choice(("DESC", "ASC"))
    if not _tie_free(_ranked(t, c, t.all_rows(), order), 2):
        return None
    sql = select(t, q(t.headers[0]), tail=f" ORDER BY {cast(t, c)} {order} LIMIT 1 OFFSET 1")
    return phrase(rng, "ranking.second", (
        "Which {key} has the second {sup} {col}?",
        "What is the {key} of the {ent} ranked second by {col} ({sup} first)?",
        "Name the {ent} with the second-{sup} {col}.",
    ), sql, col=t.label(c), sup=rng.choice(SUPERLATIVE[order]), **base_fields(t))


def ranking_within_group(rng: random.Random, t: Table) -> Draft | None:
    cond = pick_eq(rng, t, 2, len(t.rows))
    if cond is None:
        return None
    c, order = rng.choice(t.cols(*NUM_KINDS)), rng.choice(("DESC", "ASC"))
    if not _tie_free(_ranked(t, c, matching(t, [cond]), order), 1):
        return None
    sql = select(t, q(t.headers[0]), [cond], tail=f" ORDER BY {cast(t, c)} {order} LIMIT 1")
    return phrase(rng, "ranking.within_group", (
        "Among {ents} whose {cond}, which {key} has the {sup} {col}?",
        "Which {ent} with {c1} {v1} has the {sup} {col}?",
        "For {c1} {v1}, name the {key} with the {sup} {col}.",
    ), sql, cond=cond.text(rng, t), c1=t.label(cond.col), v1=cond.value, col=t.label(c),
        sup=rng.choice(SUPERLATIVE[order]), **base_fields(t))


def ranking_most_common(rng: random.Random, t: Table) -> Draft | None:
    c, order = rng.choice(t.cols(*FILTER_KINDS)), rng.choice(("DESC", "ASC"))
    counts = sorted(Counter(row[c] for row in t.rows).values(), reverse=order == "DESC")
    if len(counts) < 2 or counts[0] == counts[1]:
        return None
    sql = select(t, q(t.headers[c]), tail=f" GROUP BY {q(t.headers[c])} ORDER BY COUNT(*) {order} LIMIT 1")
    most = order == "DESC"
    return phrase(rng, "ranking.most_common", (
        "Which {col} appears {freq} often in the table?",
        "What is the {freq2} common {col}?",
        "Which {col} has the {fewest} {ents}?",
    ), sql, col=t.label(c), freq="most" if most else "least", freq2="most" if most else "least",
        fewest="most" if most else "fewest", **base_fields(t))


# ------------------------------------------------------------------------------------- aggregations


def _optional_filter(rng: random.Random, t: Table) -> list[Cond]:
    if rng.random() < 0.4:
        return []
    cond = pick_eq(rng, t, 1, len(t.rows))
    return [cond] if cond else []


def _scope(rng: random.Random, t: Table, conds: Sequence[Cond]) -> str:
    if not conds:
        return rng.choice(("", " across all {ents}", " in the {table} table")).format(**base_fields(t))
    return f" for {t.domain.entities} whose " + " and ".join(c.text(rng, t) for c in conds)


def _sum_or_avg_conditions(rng: random.Random, t: Table, c: int) -> list[Cond] | None:
    if rng.random() < 0.7:
        return _optional_filter(rng, t)
    other = [i for i in t.cols(*NUM_KINDS) if i != c]
    cond = pick_threshold(rng, t, rng.choice(other), 1, len(t.rows)) if other else None
    return [cond] if cond else None


def aggregation_sum(rng: random.Random, t: Table) -> Draft | None:
    # Only counts and money add up meaningfully; money sums are rounded, as float addition order differs.
    cols = t.cols("count", "money")
    if not cols:
        return None
    c = rng.choice(cols)
    conds = _sum_or_avg_conditions(rng, t, c)
    if conds is None:
        return None
    money = t.kind(c) == "money"
    what = f"ROUND(SUM({q(t.headers[c])}), 2)" if money else f"SUM({q(t.headers[c])})"
    draft = phrase(rng, "aggregation.sum", (
        "What is the total {col}{scope}?",
        "Sum the {col}{scope}.",
        "What is the combined {col}{scope}?",
        "Add up the {col}{scope}. What do you get?",
    ), select(t, what, conds), col=t.label(c), scope=_scope(rng, t, conds))
    return draft._replace(description=draft.description + rng.choice(ROUNDING)) if money else draft


def _min_max(rng: random.Random, t: Table, fn: str) -> Draft | None:
    dates = [c for c in t.cols("date") if t.date_format[c] == "iso"]  # ISO dates order as text
    c = rng.choice(t.cols(*NUM_KINDS) + dates)
    conds = _optional_filter(rng, t)
    plain = t.kind(c) in ("date", "year")  # fixed-width text: MIN/MAX as text is already numeric order
    what = f"{fn}({q(t.headers[c])})" if plain else f"{fn}({cast(t, c)})"
    words = ("earliest", "first") if fn == "MIN" else ("latest", "most recent")
    if t.kind(c) != "date":
        words = ("lowest", "smallest", "minimum") if fn == "MIN" else ("highest", "largest", "maximum")
    return phrase(rng, f"aggregation.{fn.lower()}", (
        "What is the {w} {col}{scope}?",
        "Find the {w} {col} recorded{scope}.",
        "What {col} is the {w}{scope}?",
    ), select(t, what, conds), w=rng.choice(words), col=t.label(c), scope=_scope(rng, t, conds))


def aggregation_min(rng: random.Random, t: Table) -> Draft | None:
    return _min_max(rng, t, "MIN")


def aggregation_max(rng: random.Random, t: Table) -> Draft | None:
    return _min_max(rng, t, "MAX")


def aggregation_avg(rng: random.Random, t: Table) -> Draft | None:
    c = rng.choice(t.cols(*NUM_KINDS))
    conds = _sum_or_avg_conditions(rng, t, c)
    if conds is None:
        return None
    rows = matching(t, conds)
    if not rows:
        return None
    mean = sum(num(t.rows[r][c]) for r in rows) / len(rows)
    # Integer inputs with a mean in quarters are exact binary floats on both engines; otherwise round,
    # but never at an exact half, where SQLite (half away from zero) and MySQL (half even) differ.
    exact = t.kind(c) in INT_KINDS and (mean * 4).denominator == 1
    if not exact and mean * 100 - math.floor(mean * 100) == Fraction(1, 2):
        return None
    what = f"AVG({q(t.headers[c])})" if exact else f"ROUND(AVG({q(t.headers[c])}), 2)"
    draft = phrase(rng, "aggregation.avg", (
        "What is the average {col}{scope}?",
        "What is the mean {col}{scope}?",
        "On average, what is the {col}{scope}?",
    ), select(t, what, conds), col=t.label(c), scope=_scope(rng, t, conds))
    return draft if exact else draft._replace(description=draft.description + rng.choice(ROUNDING))


# ------------------------------------------------------------------------------------- modifications


def show_value(t: Table, c: int, value: str) -> str:
    """A value to store, as a question states it: numbers bare, anything else in double quotes."""
    return value if t.kind(c) in NUM_KINDS else f'"{value}"'


def _pairs(t: Table, cols: Sequence[int], values: Sequence[str]) -> str:
    return ", ".join(f"{t.label(c)} {show_value(t, c, v)}" for c, v in zip(cols, values))


def insert_row(rng: random.Random, t: Table) -> Draft | None:
    row = _new_row(rng, t)
    cols = list(range(len(t.headers)))
    names = "" if rng.random() < 0.25 else " (" + ", ".join(q(h) for h in t.headers) + ")"
    sql = f"INSERT INTO {q(t.name)}{names} VALUES ({', '.join(lit(v) for v in row)});"
    return phrase(rng, "insert.row", (
        "Add a new {ent} to the {table} table with {pairs}.",
        "Insert a record into {table}: {pairs}.",
        "A new {ent} needs to be recorded: {pairs}.",
        "Please register the following {ent}: {pairs}.",
    ), sql, pairs=_pairs(t, cols, row), **base_fields(t))


def _new_value(rng: random.Random, t: Table, c: int, old: Sequence[str]) -> str | None:
    """A value for column c that differs from every value in `old` (so the update changes the table)."""
    taken = {v.casefold() for v in old}
    for _ in range(20):
        value = _value(rng, t, c)
        if value.casefold() not in taken:
            return value
    return None


def update_by_key(rng: random.Random, t: Table) -> Draft | None:
    r = rng.randrange(len(t.rows))
    cols = sorted(rng.sample(range(1, len(t.headers)), rng.choice((1, 1, 2))))
    values = [_new_value(rng, t, c, [t.rows[r][c]]) for c in cols]
    if None in values:
        return None
    sets = ", ".join(f"{q(t.headers[c])} = {lit(v)}" for c, v in zip(cols, values))
    kv = t.rows[r][0]
    sql = f"UPDATE {q(t.name)} SET {sets}{where(t, [Cond(0, '=', kv)])};"
    changes = " and ".join(f"the {t.label(c)} to {show_value(t, c, v)}" for c, v in zip(cols, values))
    return phrase(rng, "update.by_key", (
        "Change {changes} for the {ent} with {key} {kv}.",
        "In the {table} table, set {changes} where the {key} is {kv}.",
        "Update the record of {kv}: set {changes}.",
        "The {ent} {kv} was corrected; update {changes}.",
    ), sql, changes=changes, kv=show(t, 0, kv), **base_fields(t))


def update_by_condition(rng: random.Random, t: Table) -> Draft | None:
    if rng.random() < 0.5:
        cond = pick_eq(rng, t, 1, len(t.rows))
    else:
        cond = pick_threshold(rng, t, rng.choice(t.cols(*NUM_KINDS)), 1, len(t.rows) - 1)
    if cond is None:
        return None
    rows = matching(t, [cond])
    # Many rows get the same value: a category, number or date, never a person or a title.
    targets = t.cols(*FILTER_KINDS, *NUM_KINDS, "date", skip=(0, cond.col))
    if not targets:
        return None
    c = rng.choice(targets)
    value = _new_value(rng, t, c, [t.rows[r][c] for r in rows])
    if value is None:
        return None
    sql = f"UPDATE {q(t.name)} SET {q(t.headers[c])} = {lit(value)}{where(t, [cond])};"
    return phrase(rng, "update.by_condition", (
        "Set the {col} to {v} for every {ent} whose {cond}.",
        "Update all rows of {table} where the {cond} so that their {col} becomes {v}.",
        "Every {ent} with a {np} should have {col} {v}. Make that change.",
    ), sql, col=t.label(c), v=show_value(t, c, value), **cond_fields(rng, t, cond), **base_fields(t))


def delete_by_key(rng: random.Random, t: Table) -> Draft | None:
    kv = t.rows[rng.randrange(len(t.rows))][0]
    sql = f"DELETE FROM {q(t.name)}{where(t, [Cond(0, '=', kv)])};"
    return phrase(rng, "delete.by_key", (
        "Remove the {ent} with {key} {kv} from the table.",
        "Delete the record whose {key} is {kv}.",
        "{kv} should no longer be in the {table} table; delete it.",
    ), sql, kv=show(t, 0, kv), **base_fields(t))


def delete_by_condition(rng: random.Random, t: Table) -> Draft | None:
    if rng.random() < 0.5:
        cond = pick_eq(rng, t, 1, len(t.rows) - 1)
    else:
        cond = pick_threshold(rng, t, rng.choice(t.cols(*NUM_KINDS)), 1, len(t.rows) - 1)
    if cond is None:
        return None
    return phrase(rng, "delete.by_condition", (
        "Delete all {ents} whose {cond}.",
        "Remove every row of {table} where the {cond}.",
        "Drop the records of {ents} with a {np} from the table.",
    ), f"DELETE FROM {q(t.name)}{where(t, [cond])};", **cond_fields(rng, t, cond), **base_fields(t))


Template = Callable[[random.Random, Table], "Draft | None"]
TEMPLATES: dict[str, tuple[Template, ...]] = {
    "other": (other_lookup, other_reverse, other_list, other_two_conditions, other_like),
    "counting": (counting_eq, counting_threshold, counting_distinct, counting_two_conditions),
    "comparison": (comparison_threshold, comparison_with_filter, comparison_range, comparison_other_column),
    "ranking": (ranking_top, ranking_top_k, ranking_second, ranking_within_group, ranking_most_common),
    "aggregation-SUM": (aggregation_sum,),
    "aggregation-MIN": (aggregation_min,),
    "aggregation-MAX": (aggregation_max,),
    "aggregation-AVG": (aggregation_avg,),
    "INSERT": (insert_row,),
    "UPDATE": (update_by_key, update_by_condition),
    "DELETE": (delete_by_key, delete_by_condition),
}

# ------------------------------------------------------------------------------------- labels and entries


def run_select(t: Table, sql: str) -> list[str] | None:
    """The label the environment would produce, or None when the result is unusable as a task."""
    db = _BACKEND.open(t.spec())
    try:
        observation = db.execute(sql)
    finally:
        db.close()
    if not observation.startswith("["):
        raise RuntimeError(f"generated SQL failed on SQLite: {sql!r}: {observation}")
    rows = ast.literal_eval(observation)
    if not rows or len(observation) >= MAX_OBSERVATION or any(cell is None for row in rows for cell in row):
        return None
    values = _values(observation)
    return values if len(values) <= MAX_VALUES else None


def run_modification(t: Table, sql: str) -> str | None:
    """AgentBench's table hash after the statement, or None when it changes nothing or empties the table."""
    db = _BACKEND.open(t.spec())
    try:
        before = db.table_hash()
        observation = db.execute(sql)
        after = db.table_hash()
    finally:
        db.close()
    if observation != "[]":
        raise RuntimeError(f"generated SQL failed on SQLite: {sql!r}: {observation}")
    return None if after in (before, EMPTY_TABLE_HASH) else after


def _entry(kind: str, t: Table, draft: Draft, label: list[str], answer_md5: str | None, shard: str) -> dict:
    columns = [{"name": h, "type": "TEXT"} for h in t.headers]  # AgentBench stores every column as TEXT
    entry: dict[str, Any] = {
        "description": draft.description,
        "label": label,
        "table": {"table_name": t.name, "table_info": {"columns": columns, "rows": [list(r) for r in t.rows]}},
        "evaluation": "", "example": "",
        "type": [kind],
        "heads": list(t.headers),
        "add_description": f"The name of this table is {t.name}, and the headers of this table are "
                           f"{','.join(t.headers)}.",
    }
    if answer_md5 is None:
        entry["sql"] = {"query": draft.sql, "length": len(draft.sql)}
    entry["source"] = f"synth:{shard}"
    if answer_md5 is not None:
        entry["answer_md5"] = answer_md5
    digest = hashlib.sha256(json.dumps(entry, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    entry["id"] = f"synth-{digest[:16]}"
    entry["meta"] = {
        "domain": t.domain.name, "template": draft.template, "phrasing": draft.phrasing,
        "column_kinds": {h: t.kind(i) for i, h in enumerate(t.headers)},
    }
    return entry


def _make_task(rng: random.Random, kind: str, shard: str, domains: Sequence[Domain] = _DOMAIN_SPECS) -> dict:
    templates = TEMPLATES[kind]
    for _ in range(200):
        table = _make_table(rng, rng.choice(domains))
        for template in rng.sample(templates, len(templates)):
            draft = template(rng, table)
            if draft is None:
                continue
            if kind in MODIFICATIONS:
                md5 = run_modification(table, draft.sql)
                if md5 is not None:
                    return _entry(kind, table, draft, [draft.sql], md5, shard)
            else:
                label = run_select(table, draft.sql)
                if label is not None and not (kind == "counting" and label == ["0"]):
                    return _entry(kind, table, draft, label, None, shard)
    raise RuntimeError(f"could not generate a {kind} task in 200 tables")  # never seen; a bug if it happens


def _check_args(n: Any, seed: Any, shard: Any, types: Sequence[str] | None) -> tuple[str, ...]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not isinstance(shard, str):
        raise ValueError(f"shard must be a string, got {shard!r}")
    if types is None:
        return DB_TASK_TYPES
    types = _known(types, DB_TASK_TYPES, "dbbench task type(s)")
    if not types:
        raise ValueError(f"types must name at least one of: {', '.join(DB_TASK_TYPES)}")
    return tuple(dict.fromkeys(types))


def domain_specs(domains: Sequence[str] | None) -> tuple[Domain, ...]:
    """The built-in domains named in `domains` (all of them when None or empty), in built-in order."""
    if not domains:
        return _DOMAIN_SPECS
    wanted = set(_known(domains, DOMAINS, "table domain(s)"))
    return tuple(d for d in _DOMAIN_SPECS if d.name in wanted)


def _known(names: Sequence[str] | str, allowed: Sequence[str], what: str) -> list[str]:
    """`names` as a list (a bare string is one name); ValueError listing the unknown ones and the choices."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; allowed: {', '.join(allowed)}")
    return names


def derive_seed(seed: int, shard: str, index: int) -> int:
    """Task `index`'s own seed: a SHA-256 of (seed, shard, index), independent of Python's hash()."""
    digest = hashlib.sha256(f"cmat-dbgen\x1f{seed}\x1f{shard}\x1f{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def generate_db_tasks(n: int, seed: int, shard: str, types: Sequence[str] | None = None,
                      domains: Sequence[str] | None = None) -> list[dict]:
    """n dbbench-format task entries, deterministic in (n, seed, shard); different shards give different tasks.

    Types go round-robin over `types` (all of DB_TASK_TYPES when None); tables come from `domains` (all of
    DOMAINS when None or empty); task i depends only on (seed, shard, i, its type, the domains), so a
    shorter run is a prefix of a longer one.
    """
    kinds = _check_args(n, seed, shard, types)
    specs = domain_specs(domains)
    return [_make_task(random.Random(derive_seed(seed, shard, i)), kinds[i % len(kinds)], shard, specs)
            for i in range(n)]
