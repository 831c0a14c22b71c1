"""Write dataset/amazon-beauty-sample/: a tiny dataset in RecBole's Amazon-2014 atomic format.

Same headers as RecBole's converted Amazon Beauty (``amazon-beauty.inter`` / ``.item``), and the
same quirks: ``title`` as a single token field, ``categories`` written as Python-set text
(``'Beauty', 'Skin Care', 'Face'``), HTML entities in titles, and empty cells (missing title,
brand, price, categories). Interactions are synthetic: each user prefers one product line, so
models can learn something. Deterministic; run: python dataset/make_amazon_beauty_sample.py
"""
import random
from pathlib import Path

LINES = {
    "Skin Care": ["Hydrating Face Cream", "Vitamin C Serum", "Gentle Foaming Cleanser", "Night Repair Oil",
                  "SPF 30 Day Lotion", "Clay Detox Mask", "Rose Water Toner", "Retinol Eye Cream"],
    "Hair Care": ["Argan Oil Shampoo", "Keratin Conditioner", "Curl Defining Cream", "Heat Protect Spray",
                  "Dry Shampoo Powder", "Repair Hair Mask", "Volumizing Mousse", "Scalp Scrub"],
    "Makeup": ["Matte Liquid Lipstick", "Waterproof Mascara", "Liquid Foundation", "Brow Pencil",
               "Highlighter Palette", "Setting Powder", "Gel Eyeliner", "Cream Blush"],
    "Fragrance": ["Citrus Eau de Toilette", "Vanilla Body Mist", "Oud Eau de Parfum", "Lavender Roll-On",
                  "Fresh Cologne", "Jasmine Perfume Oil", "Amber Solid Perfume", "Sea Salt Mist"],
    "Nails": ["Gel Top Coat", "Cuticle Oil Pen", "Nail Strengthener", "Quick Dry Polish",
              "Acetone-Free Remover", "Glitter Polish", "Base Coat", "Nail File Set"],
}
BRANDS = ["L&#39;Or&eacute;al", "Neutrogena", "Olay", "Maybelline", "Burt&#39;s Bees", "", "OPI", "Dove"]
HEADER_INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
HEADER_ITEM = ("item_id:token\ttitle:token\tsales_type:token\tsales_rank:float\t"
               "categories:token_seq\tprice:float\tbrand:token")


def main(n_users=48, seed=2024):
    rng = random.Random(seed)
    items = []
    for line, names in LINES.items():
        for name in names:
            asin = f"B00{len(items):05d}X"
            brand = rng.choice(BRANDS)
            title = f"{brand} {name}" if brand else name
            if rng.random() < 0.12:
                title = title.replace(" & ", " &amp; ") + " &amp; Travel Size"
            categories = ", ".join(repr(c) for c in ["Beauty", line, name.split()[-1]])
            price = f"{rng.uniform(3, 60):.2f}" if rng.random() > 0.15 else ""
            if rng.random() < 0.08:
                title = ""  # items without a title exist in the real files
            if rng.random() < 0.08:
                categories = ""
            sales_rank = str(rng.randint(1000, 900000)) if rng.random() > 0.2 else ""
            items.append((asin, title, "Beauty", sales_rank, categories, price, brand, line))
    inter = []
    start = 1388534400  # 2014-01-01
    for u in range(n_users):
        user = f"A{u:04d}USER"
        favourite, second = rng.sample(list(LINES), 2)
        n = rng.randint(6, 14)
        t = start + rng.randint(0, 3_000_000)
        pool = [i for i in items if i[7] == favourite] * 3 + [i for i in items if i[7] == second] + items
        for item in rng.sample(pool, k=n * 2)[: n * 2]:
            if any(row[1] == item[0] for row in inter if row[0] == user):
                continue
            t += rng.randint(3600, 400_000)
            inter.append((user, item[0], f"{rng.choice([3, 4, 4, 5, 5]):.1f}", f"{t:.1f}"))
            if sum(row[0] == user for row in inter) >= n:
                break
    folder = Path(__file__).parent / "amazon-beauty-sample"
    folder.mkdir(exist_ok=True)
    with open(folder / "amazon-beauty-sample.inter", "w", encoding="utf-8") as f:
        f.write(HEADER_INTER + "\n" + "\n".join("\t".join(r) for r in inter) + "\n")
    with open(folder / "amazon-beauty-sample.item", "w", encoding="utf-8") as f:
        f.write(HEADER_ITEM + "\n" + "\n".join("\t".join(i[:7]) for i in items) + "\n")
    print(f"{len(inter)} interactions, {n_users} users, {len(items)} items -> {folder}")


if __name__ == "__main__":
    main()
