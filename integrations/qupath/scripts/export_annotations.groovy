/*
 * lpfm-toolkit: export every image's annotations to <project>/annotations/<entryID>.geojson,
 * where `lpfm qupath enhance` looks for them (file backend).
 *
 * Use: open the project in QuPath, Automate › Script editor, open this file, Run.
 * Written for QuPath 0.4–0.7 (0.3: falls back to a bare GeoJSON list). NOT run in CI: no QuPath there.
 * Licence: GPL-3.0-or-later (lpfm-toolkit).
 */
import qupath.lib.io.GsonTools

def project = getProject()
if (project == null) {
    println 'lpfm: open a project first'
    return
}
def folder = buildFilePath(PROJECT_BASE_DIR, 'annotations')
mkdirs(folder)
int written = 0
for (entry in project.getImageList()) {
    if (!entry.hasImageData())
        continue  // never opened in QuPath: no annotations yet
    def annotations = entry.readHierarchy().getAnnotationObjects()
    def path = buildFilePath(folder, entry.getID() + '.geojson')
    try {
        exportObjectsToGeoJson(annotations, path, 'FEATURE_COLLECTION')  // QuPath 0.4+
    } catch (MissingMethodException ignored) {
        new File(path).withWriter('UTF-8') { GsonTools.getInstance(true).toJson(annotations, it) }  // 0.3
    }
    println "lpfm: ${annotations.size()} annotations of ${entry.getImageName()} → ${path}"
    written++
}
println "lpfm: exported ${written} images to ${folder}"
